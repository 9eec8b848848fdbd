//! The rules account input follows. The API checks them (with `validator`) before anything is
//! done, and each is also its field's OpenAPI schema (`TextRule::schema`), so the document and
//! the checks agree; the database repeats the essential ones as constraints.

use service_kit::input::{Text, TextRule};
use validator::ValidationError;

/// 3–30 letters, digits, `_`, `.` and `-`, starting with a letter or digit (case is folded).
pub const USERNAME: TextRule = TextRule::any(3, 30).matching(
    "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    "use letters, digits, '_', '.' or '-', starting with a letter or digit",
);
/// What login takes as a username: anything a username could be, and more (it just fails).
pub const LOGIN_USERNAME: TextRule = TextRule::any(1, 30);
/// A new password: 8–128 characters.
pub const NEW_PASSWORD: TextRule = TextRule::any(8, 128);
/// A password presented: 1–128 characters.
pub const PASSWORD: TextRule = TextRule::any(1, 128);
/// 1–30 characters, printable, not blank.
pub const NICKNAME: TextRule = TextRule::printable(1, 30);
/// An absolute `http`/`https` URL with a host name and a path, at most 200 characters, in the
/// URL characters that need no escaping. The pattern is what the `url` crate parses without
/// surprises: a last host label starting with a letter (a numeric one would be read as an IPv4
/// address), a port up to 65535, and a path, so the stored (normalised) URL is never longer than
/// what was sent.
pub const AVATAR_URL: TextRule = TextRule::any(1, 200).matching(
    concat!(
        "^[Hh][Tt][Tt][Pp][Ss]?://",
        "(?:[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\\.)*[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*",
        "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?",
        "/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*",
        "(?:\\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?",
        "(?:#[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?$",
    ),
    "must be an absolute http:// or https:// URL with a host name and a path",
);
/// A refresh token presented: 1–256 characters (ours are 43).
pub const REFRESH_TOKEN: TextRule = TextRule::any(1, 256);

pub fn username(text: &Text) -> Result<(), ValidationError> {
    USERNAME.check(text)
}

pub fn login_username(text: &Text) -> Result<(), ValidationError> {
    LOGIN_USERNAME.check(text)
}

pub fn new_password(text: &Text) -> Result<(), ValidationError> {
    NEW_PASSWORD.check(text)
}

pub fn password(text: &Text) -> Result<(), ValidationError> {
    PASSWORD.check(text)
}

pub fn nickname(text: &Text) -> Result<(), ValidationError> {
    NICKNAME.check(text)
}

pub fn avatar_url(text: &Text) -> Result<(), ValidationError> {
    AVATAR_URL.check(text)?;
    web_url(text).map(drop)
}

pub fn refresh_token(text: &Text) -> Result<(), ValidationError> {
    REFRESH_TOKEN.check(text)
}

/// Usernames are case-insensitive: stored and compared lower-cased.
pub fn normalize_username(username: &str) -> String {
    username.to_ascii_lowercase()
}

/// `text` parsed as an absolute `http` or `https` URL with a host, in its normal form (what is
/// stored: `HTTPS://CDN.example.com:443/a/../b.png` becomes `https://cdn.example.com/b.png`).
pub fn web_url(text: &str) -> Result<url::Url, ValidationError> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err(ValidationError::new("web_url")
            .with_message("must be an absolute http:// or https:// URL".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> Text {
        Text::parse(value).unwrap()
    }

    #[test]
    fn usernames_use_a_safe_alphabet() {
        for good in ["alice", "Bob_99", "a.b-c", "007"] {
            assert!(username(&text(good)).is_ok(), "{good}");
        }
        for bad in ["_alice", ".x", "al ice", "al/ice", "ålice", "ab", ""] {
            assert!(username(&text(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_username("Bob_99"), "bob_99");
    }

    #[test]
    fn nicknames_are_printable_and_not_blank() {
        assert!(nickname(&text("Ada ✨")).is_ok());
        assert!(nickname(&text("   ")).is_err());
        assert!(nickname(&text("tab\there")).is_err());
    }

    #[test]
    fn avatar_urls_are_web_urls_stored_in_normal_form() {
        for good in [
            "https://cdn.example.com/a.png",
            "http://localhost:8080/x",
            "https://a.io/avatars/ada.png?size=64#top",
        ] {
            assert!(avatar_url(&text(good)).is_ok(), "{good}");
        }
        for bad in [
            "javascript:alert(1)",
            "ftp://x/y",
            "data:image/png;base64,AA",
            "/relative",
            "https://",
            "https://cdn.example.com",
            "https://1.2.3.999/a.png",
            "https://a.io:99999/a.png",
            "https://a.io/a b.png",
        ] {
            assert!(avatar_url(&text(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            web_url("HTTPS://CDN.example.com:443/a/../b.png")
                .unwrap()
                .as_str(),
            "https://cdn.example.com/b.png"
        );
    }
}
