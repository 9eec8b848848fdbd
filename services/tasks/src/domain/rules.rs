//! The rules task input follows, checked by the API (with `validator`) before anything is done;
//! the database repeats the essential ones as constraints. Each text rule is also the field's
//! OpenAPI schema (`TextRule::schema`), so the document and the checks agree.

use service_kit::input::{Text, TextRule};
use validator::ValidationError;

pub const LABELS_MAX: u64 = 20;
pub const PAGE_DEFAULT: u32 = 50;
pub const PAGE_MAX: u32 = 200;

/// 1–200 characters, not blank, no control characters.
pub const TITLE: TextRule = TextRule::printable(1, 200);
/// At most 10,240 characters (the database's `tasks_description_length`).
pub const DESCRIPTION: TextRule = TextRule::any(0, 10_240);
/// 1–40 characters without whitespace, control characters or commas.
pub const LABEL: TextRule = TextRule::any(1, 40).matching(
    "^[^\\s,\\u0000-\\u001f\\u007f-\\u009f]+$",
    "must have no spaces, commas or control characters",
);

pub fn title(text: &Text) -> Result<(), ValidationError> {
    TITLE.check(text)
}

pub fn description(text: &Text) -> Result<(), ValidationError> {
    DESCRIPTION.check(text)
}

pub fn label(text: &Text) -> Result<(), ValidationError> {
    LABEL.check(text)
}

/// Each label follows [`LABEL`]; the message names the one that does not.
pub fn labels(labels: &[Text]) -> Result<(), ValidationError> {
    for text in labels {
        if let Err(err) = LABEL.check(text) {
            let rule = err.message.unwrap_or_default();
            return Err(ValidationError::new("label")
                .with_message(format!("each label {rule}; {:?} is not", text.as_str()).into()));
        }
    }
    Ok(())
}

/// Labels are case-insensitive and a set: lower-cased, duplicates dropped, first spelling kept.
pub fn normalize_labels(labels: Vec<Text>) -> Vec<String> {
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

    fn text(value: &str) -> Text {
        Text::parse(value).unwrap()
    }

    #[test]
    fn titles_are_printable_and_not_blank() {
        assert!(title(&text("Buy milk")).is_ok());
        assert!(title(&text("  ")).is_err());
        assert!(title(&text("a\nb")).is_err());
        assert!(title(&text(&"x".repeat(201))).is_err());
    }

    #[test]
    fn descriptions_are_bounded_in_characters() {
        assert!(description(&text(&"é".repeat(10_240))).is_ok());
        assert!(description(&text(&"a".repeat(10_241))).is_err());
    }

    #[test]
    fn labels_are_single_words_and_normalized() {
        assert!(labels(&[text("home"), text("q3:planning")]).is_ok());
        for bad in ["", "two words", "a,b", &"x".repeat(41)] {
            assert!(labels(&[text(bad)]).is_err(), "{bad:?}");
        }
        assert_eq!(
            normalize_labels(vec![text("Home"), text("work"), text("HOME")]),
            vec!["home".to_owned(), "work".to_owned()]
        );
    }
}
