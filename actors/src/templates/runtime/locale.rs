//! Which locale variant of a runtime template a recipient gets.

/// The variant for `requested` among `available`: the whole tag (`de-DE`), then its language
/// (`de`), then the default locale (and its language), then the first available. `None` only when
/// nothing is available. Comparison ignores case and treats `_` like `-`.
pub fn pick(available: &[&str], requested: &str, default: &str) -> Option<usize> {
    let wanted = [requested, language(requested), default, language(default)];
    wanted
        .iter()
        .filter(|want| !want.is_empty())
        .find_map(|want| available.iter().position(|have| same(have, want)))
        .or_else(|| (!available.is_empty()).then_some(0))
}

fn language(tag: &str) -> &str {
    tag.trim().split(['-', '_']).next().unwrap_or_default()
}

fn same(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().replace('_', "-").to_ascii_lowercase();
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn exact_tag_then_language_then_default_then_any() {
        let have = ["fr", "de", "de-AT", "en"];
        assert_eq!(pick(&have, "de-AT", "en"), Some(2));
        assert_eq!(pick(&have, "de_at", "en"), Some(2));
        assert_eq!(pick(&have, "de-DE", "en"), Some(1));
        assert_eq!(pick(&have, "it-IT", "en"), Some(3));
        assert_eq!(pick(&have, "it", "en-GB"), Some(3));
        assert_eq!(pick(&["fr", "es"], "it", "en"), Some(0));
        assert_eq!(pick(&[], "de", "en"), None);
        assert_eq!(pick(&["en", "de"], "", "de"), Some(1));
    }
}
