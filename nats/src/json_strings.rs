//! Looking through the strings of a JSON document, naming where a string is as the API and the
//! Router name fields in their errors: `recipient.email`, `items[0].name`.

use serde_json::Value;

/// The first string of `value` for which `find` answers something, and its path below `at`.
/// `find` is given each string's path and text; an object's keys are given too, with the path of
/// the object that has them (a key names no field of its own).
pub fn first_string<T>(
    value: &Value,
    at: &str,
    find: &mut dyn FnMut(&str, &str) -> Option<T>,
) -> Option<(String, T)> {
    match value {
        Value::String(text) => find(at, text).map(|found| (at.to_string(), found)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| first_string(item, &format!("{at}[{index}]"), find)),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            if let Some(found) = find(at, key) {
                return Some((at.to_string(), found));
            }
            let below = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            first_string(field, &below, find)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_keys_are_named_by_their_path() {
        let value = serde_json::json!({
            "recipient": { "email": "ada@example.com" },
            "items": [{ "name": "Tea" }, { "name": "Cake" }],
            "odd key": 1
        });
        let is = |wanted: &'static str| move |_: &str, text: &str| (text == wanted).then_some(());
        let path = |found: Option<(String, ())>| found.map(|(path, ())| path);
        assert_eq!(
            path(first_string(&value, "", &mut is("Cake"))),
            Some("items[1].name".into())
        );
        assert_eq!(
            path(first_string(&value, "", &mut is("ada@example.com"))),
            Some("recipient.email".into())
        );
        assert_eq!(
            path(first_string(&value, "", &mut is("odd key"))),
            Some(String::new()),
            "a key: the object that has it"
        );
        assert_eq!(path(first_string(&value, "", &mut is("Pie"))), None);
    }
}
