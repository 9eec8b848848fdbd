//! A stand-in PostgreSQL server for unit tests that check what database code does around its
//! queries (spans, pools, errors) without a database: it speaks just enough of the wire
//! protocol for sqlx to log in and run simple queries.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// Starts a server that takes any login, answers simple queries (BEGIN, COMMIT) and fails every
/// prepared statement with SQLSTATE XX000; returns its URL.
pub fn url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    format!("postgres://test@127.0.0.1:{port}/test?sslmode=disable")
}

fn send(stream: &mut TcpStream, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let mut message = vec![tag];
    message.extend((body.len() as u32 + 4).to_be_bytes());
    message.extend(body);
    stream.write_all(&message)
}

fn body(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0; 4];
    stream.read_exact(&mut len)?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize - 4];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    body(&mut stream)?; // the startup message
    send(&mut stream, b'R', &0u32.to_be_bytes())?; // authenticated
    let mut status = b'I';
    send(&mut stream, b'Z', &[status])?;
    loop {
        let mut tag = [0];
        stream.read_exact(&mut tag)?;
        let query = body(&mut stream)?;
        match tag[0] {
            b'Q' => {
                status = if query.starts_with(b"BEGIN") {
                    b'T'
                } else {
                    b'I'
                };
                send(&mut stream, b'C', b"OK\0")?;
                send(&mut stream, b'Z', &[status])?;
            }
            b'S' => {
                send(&mut stream, b'E', b"SERROR\0VERROR\0CXX000\0Mfake\0\0")?;
                if status == b'T' {
                    status = b'E';
                }
                send(&mut stream, b'Z', &[status])?;
            }
            b'X' => return Ok(()),
            _ => {}
        }
    }
}
