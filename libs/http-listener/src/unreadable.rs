//! Requests the HTTP layer cannot read, answered like every other error.
//!
//! actix-http refuses some HTTP/1.1 requests before any of our code runs, with an empty answer:
//! a request target it cannot hold (over 64 KiB: 400 without a body) and a head over its 128 KiB
//! buffer (431 without a body, and the connection closed with the rest of the request unread,
//! which the kernel turns into a reset: the client never sees the 431). It offers no hook for
//! either, so [`UnreadableRequests`] wraps the connection's socket:
//!
//! - it notes the longest line read since the last answer (a request line over 64 KiB is a URI
//!   too long; bodies do not matter, since a body never leads to these answers);
//! - it recognises the HTTP layer's own bodiless 400 and 431 (our handlers never answer without
//!   a JSON body) at the start of an answer and writes a JSON answer instead: 414
//!   `uri_too_long`, 431 `request_head_too_large` or 400 `malformed_request`;
//! - when it did, closing the connection lingers: it stops writing, then reads and drops what
//!   the client still sends (at most [`LINGER_BYTES`] for [`LINGER_TIME`]) so the client gets
//!   the answer, not a reset.
//!
//! HTTP/2 connections are passed through untouched: their limits are frames and HPACK's.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A line this long is a request target no HTTP/1.1 layer here can hold (the `http` crate stops
/// at 65,534 bytes; `GET ` and ` HTTP/1.1` come on top).
const LONGEST_READABLE_LINE: usize = 65_534;
/// How much of the rest of a refused request is read and dropped before the connection closes.
pub const LINGER_BYTES: usize = 1 << 20;
/// How long the rest of a refused request is waited for.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// The HTTP layer's bodiless refusals, as it writes them.
const BARE_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\n";
const BARE_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n";

/// A connection's socket that answers unreadable requests with JSON (see the module).
pub struct UnreadableRequests<IO> {
    io: IO,
    /// HTTP/1.1 (watched) or HTTP/2 (passed through).
    http1: bool,
    /// Bytes since the last line feed read, and the longest line since the last answer.
    line: usize,
    longest_line: usize,
    /// The JSON answer written instead of the HTTP layer's, and how much of it is out.
    replacement: Option<(Vec<u8>, usize)>,
    /// Set once an answer was replaced: closing lingers (bytes dropped so far, and the deadline).
    linger: Option<(usize, Option<Pin<Box<tokio::time::Sleep>>>)>,
}

impl<IO> UnreadableRequests<IO> {
    pub fn new(io: IO, http1: bool) -> Self {
        Self {
            io,
            http1,
            line: 0,
            longest_line: 0,
            replacement: None,
            linger: None,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn note_read(&mut self, bytes: &[u8]) {
        match (
            bytes.iter().position(|&b| b == b'\n'),
            bytes.iter().rposition(|&b| b == b'\n'),
        ) {
            (Some(first), Some(last)) => {
                self.longest_line = self.longest_line.max(self.line + first);
                self.line = bytes.len() - last - 1;
            }
            _ => self.line += bytes.len(),
        }
        self.longest_line = self.longest_line.max(self.line);
    }

    /// The JSON answer for the HTTP layer's bodiless refusal `head`, if it is one.
    fn replace(&self, head: &[u8]) -> Option<Vec<u8>> {
        let bodiless = head.windows(4).any(|w| w == b"\r\n\r\n")
            && String::from_utf8_lossy(head)
                .to_ascii_lowercase()
                .contains("\r\ncontent-length: 0\r\n");
        if !bodiless {
            return None;
        }
        let (status, code, message) = if head.starts_with(BARE_431) {
            (
                "431 Request Header Fields Too Large",
                "request_head_too_large",
                "the request's head (request line and headers) is over 128 KiB",
            )
        } else if head.starts_with(BARE_400) {
            if self.longest_line > LONGEST_READABLE_LINE {
                (
                    "414 URI Too Long",
                    "uri_too_long",
                    "the request target is over 64 KiB",
                )
            } else {
                (
                    "400 Bad Request",
                    "malformed_request",
                    "the request is not valid HTTP/1.1",
                )
            }
        } else {
            return None;
        };
        let body = json!({ "error": { "code": code, "message": message } }).to_string();
        Some(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }
}

impl<IO: AsyncWrite + Unpin> UnreadableRequests<IO> {
    /// Writes out what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((answer, written)) = &mut self.replacement {
            if *written == answer.len() {
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for UnreadableRequests<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.http1 {
            this.note_read(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for UnreadableRequests<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacement.is_some() {
            // The HTTP layer's own answer was replaced; the connection is closing.
            std::task::ready!(this.poll_replacement(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        if this.http1 {
            if let Some(answer) = this.replace(buf) {
                this.replacement = Some((answer, 0));
                this.linger = Some((0, None));
                std::task::ready!(this.poll_replacement(cx))?;
                return Poll::Ready(Ok(buf.len()));
            }
            // An answer: the request it answers was read whole.
            this.longest_line = this.line;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        let Some((dropped, deadline)) = &mut this.linger else {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        };
        if deadline.is_none() {
            // Our side is done: the client sees the end of the answer while we read on.
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            *deadline = Some(Box::pin(tokio::time::sleep(LINGER_TIME)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if *dropped >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The client closed (or reset): nothing more to wait for.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *dropped += buf.filled().len(),
            }
        }
    }
}

impl<IO: AsRawFd> AsRawFd for UnreadableRequests<IO> {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_for(read: &[&[u8]], written: &[u8]) -> Option<String> {
        let mut guard = UnreadableRequests::new((), true);
        for bytes in read {
            guard.note_read(bytes);
        }
        guard
            .replace(written)
            .map(|answer| String::from_utf8(answer).unwrap())
    }

    const BARE: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n";

    #[test]
    fn a_long_request_line_makes_the_bare_400_a_json_414() {
        let line = vec![b'a'; 70_000];
        let answer = answer_for(&[b"GET /", &line, b" HTTP/1.1\r\nHost: x\r\n\r\n"], BARE).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 414 URI Too Long\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with(
                r#""code":"uri_too_long","message":"the request target is over 64 KiB"}}"#
            ),
            "{answer}"
        );
        let length: usize = answer
            .split("content-length: ")
            .nth(1)
            .and_then(|rest| rest.split("\r\n").next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert_eq!(length, answer.split_once("\r\n\r\n").unwrap().1.len());
    }

    #[test]
    fn other_bare_refusals_say_what_they_are_and_answers_with_bodies_pass() {
        let short = answer_for(&[b"GET / HTTP/1.1\r\nBad\r\n\r\n"], BARE).unwrap();
        assert!(short.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{short}");
        assert!(short.contains("malformed_request"), "{short}");
        let too_large = answer_for(
            &[b"GET / HTTP/1.1\r\n"],
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
        assert!(too_large.contains("request_head_too_large"), "{too_large}");
        // Our own 400s carry a JSON body: never touched.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 20\r\n\r\n{\"error\":{}}";
        assert_eq!(answer_for(&[b"GET / HTTP/1.1\r\n\r\n"], ours), None);
        // Lines split across reads add up.
        let half = vec![b'a'; 40_000];
        let split = answer_for(&[b"GET /", &half, &half, b" HTTP/1.1\r\n\r\n"], BARE).unwrap();
        assert!(split.contains("uri_too_long"), "{split}");
    }
}
