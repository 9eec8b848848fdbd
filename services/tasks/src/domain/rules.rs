//! The rules task input follows, checked by the API (with `validator`) before anything is done;
//! the database repeats the essential ones as constraints.

use std::borrow::Cow;

use validator::ValidationError;

pub const TITLE_MAX: u64 = 200;
pub const DESCRIPTION_MAX_BYTES: usize = 10 * 1024;
pub const LABELS_MAX: u64 = 20;
pub const LABEL_MAX: usize = 40;
pub const IDEMPOTENCY_KEY_MAX: usize = 200;
pub const PAGE_DEFAULT: u32 = 50;
pub const PAGE_MAX: u32 = 200;

fn invalid(code: &'static str, message: String) -> ValidationError {
    ValidationError::new(code).with_message(Cow::Owned(message))
}

/// Not blank, no control characters.
pub fn title_text(title: &str) -> Result<(), ValidationError> {
    if title.trim().is_empty() {
        return Err(invalid("blank", "must not be blank".into()));
    }
    if title.chars().any(char::is_control) {
        return Err(invalid(
            "control_characters",
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// At most 10 KiB of UTF-8 (bytes, not characters: it is a storage bound).
pub fn description_size(description: &str) -> Result<(), ValidationError> {
    if description.len() > DESCRIPTION_MAX_BYTES {
        return Err(invalid(
            "too_large",
            format!("must be at most {DESCRIPTION_MAX_BYTES} bytes of UTF-8"),
        ));
    }
    Ok(())
}

/// Each label: 1–40 characters, no whitespace, no control characters, no commas.
pub fn labels(labels: &[String]) -> Result<(), ValidationError> {
    for label in labels {
        let length = label.chars().count();
        let bad_char = label
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',');
        if length == 0 || length > LABEL_MAX || bad_char {
            return Err(invalid(
                "label",
                format!(
                    "each label must be 1 to {LABEL_MAX} characters without spaces or commas; {label:?} is not"
                ),
            ));
        }
    }
    Ok(())
}

/// Labels are case-insensitive and a set: lower-cased, duplicates dropped, first spelling kept.
pub fn normalize_labels(labels: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    labels
        .into_iter()
        .map(|label| label.to_lowercase())
        .filter(|label| seen.insert(label.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_printable_and_not_blank() {
        assert!(title_text("Buy milk").is_ok());
        assert!(title_text("  ").is_err());
        assert!(title_text("a\nb").is_err());
    }

    #[test]
    fn descriptions_are_bounded_in_bytes() {
        assert!(description_size(&"a".repeat(DESCRIPTION_MAX_BYTES)).is_ok());
        assert!(description_size(&"é".repeat(DESCRIPTION_MAX_BYTES / 2 + 1)).is_err());
    }

    #[test]
    fn labels_are_single_words_and_normalized() {
        assert!(labels(&["home".into(), "q3:planning".into()]).is_ok());
        for bad in ["", "two words", "a,b", &"x".repeat(41)] {
            assert!(labels(&[bad.to_owned()]).is_err(), "{bad:?}");
        }
        assert_eq!(
            normalize_labels(vec!["Home".into(), "work".into(), "HOME".into()]),
            vec!["home".to_owned(), "work".to_owned()]
        );
    }
}
