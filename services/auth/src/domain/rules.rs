//! The rules account input follows. The API checks them (with `validator`) before anything is
//! done; the database repeats the essential ones as constraints.

use std::borrow::Cow;

use validator::ValidationError;

pub const USERNAME_MIN: u64 = 3;
pub const USERNAME_MAX: u64 = 30;
pub const PASSWORD_MIN: u64 = 8;
pub const PASSWORD_MAX: u64 = 128;
pub const NICKNAME_MAX: u64 = 30;
pub const AVATAR_URL_MAX: u64 = 200;

fn invalid(code: &'static str, message: &'static str) -> ValidationError {
    ValidationError::new(code).with_message(Cow::Borrowed(message))
}

/// Letters, digits, `_`, `.` and `-`, starting with a letter or digit (case is folded).
pub fn username_alphabet(username: &str) -> Result<(), ValidationError> {
    let mut chars = username.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(invalid(
            "username_alphabet",
            "use letters, digits, '_', '.' or '-', starting with a letter or digit",
        ))
    }
}

/// Usernames are case-insensitive: stored and compared lower-cased.
pub fn normalize_username(username: &str) -> String {
    username.to_ascii_lowercase()
}

/// Printable text that is not blank (no control characters, not only spaces).
pub fn display_text(text: &str) -> Result<(), ValidationError> {
    if text.trim().is_empty() {
        return Err(invalid(
            "blank",
            "must not be blank (send null to clear it)",
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(
            "control_characters",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// An absolute `http` or `https` URL with a host.
pub fn web_url(text: &str) -> Result<(), ValidationError> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        _ => Err(invalid(
            "web_url",
            "must be an absolute http:// or https:// URL",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_use_a_safe_alphabet() {
        for good in ["alice", "Bob_99", "a.b-c", "007"] {
            assert!(username_alphabet(good).is_ok(), "{good}");
        }
        for bad in ["_alice", ".x", "al ice", "al/ice", "ålice", "a\u{0}b", ""] {
            assert!(username_alphabet(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_username("Bob_99"), "bob_99");
    }

    #[test]
    fn display_text_is_printable_and_not_blank() {
        assert!(display_text("Ada ✨").is_ok());
        assert!(display_text("   ").is_err());
        assert!(display_text("tab\there").is_err());
    }

    #[test]
    fn avatar_urls_are_web_urls() {
        assert!(web_url("https://cdn.example.com/a.png").is_ok());
        assert!(web_url("http://localhost:8080/x").is_ok());
        for bad in [
            "javascript:alert(1)",
            "ftp://x/y",
            "data:image/png;base64,AA",
            "/relative",
            "https://",
        ] {
            assert!(web_url(bad).is_err(), "{bad}");
        }
    }
}
