//! Message text fitted to a provider's limits.

use std::borrow::Cow;

/// What ends a text that was cut.
const ELLIPSIS: char = '…';

/// `text` as it is when it measures at most `max` (each character counted by `units`), else its
/// longest beginning that fits with an ellipsis after it. A provider refuses a longer message
/// for good, so a long text goes out cut rather than not at all.
pub(crate) fn cut(text: &str, max: usize, units: impl Fn(char) -> usize) -> Cow<'_, str> {
    if text.chars().map(&units).sum::<usize>() <= max {
        return Cow::Borrowed(text);
    }
    let room = max.saturating_sub(units(ELLIPSIS));
    let mut used = 0;
    let end = text
        .char_indices()
        .find(|&(_, c)| {
            used += units(c);
            used > room
        })
        .map_or(text.len(), |(at, _)| at);
    let mut shortened = text[..end].trim_end().to_string();
    shortened.push(ELLIPSIS);
    Cow::Owned(shortened)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(_: char) -> usize {
        1
    }

    #[test]
    fn a_text_that_fits_is_kept_as_it_is() {
        assert!(matches!(cut("hello", 5, chars), Cow::Borrowed("hello")));
        assert_eq!(cut("", 0, chars), "");
    }

    #[test]
    fn a_longer_text_is_cut_with_an_ellipsis_within_the_limit() {
        assert_eq!(cut("hello world", 8, chars), "hello w…");
        assert_eq!(
            cut("hello world", 7, chars),
            "hello…",
            "no space before the ellipsis"
        );
        let emoji = "😀".repeat(3);
        let cut_utf16 = cut(&emoji, 5, char::len_utf16);
        assert_eq!(cut_utf16, "😀😀…", "a character is not split");
        assert!(cut_utf16.chars().map(char::len_utf16).sum::<usize>() <= 5);
    }
}
