use serde_json::{Map, Value, json};

use super::*;

/// A full set of variables for each template.
fn sample(code: &str) -> Map<String, Value> {
    let vars = match code {
        "order_placed" => json!({
            "customer_name": "Ada",
            "order_number": "1001",
            "total": "42.00 EUR",
            "items": [{"name": "Tea", "quantity": 2, "price": "42.00 EUR"}],
        }),
        "order_shipped" => json!({
            "customer_name": "Ada",
            "order_number": "1001",
            "tracking_number": "1Z999AA1",
            "delivery_estimate": "2026-12-01",
        }),
        "order_delivered" => json!({
            "order_number": "1001",
            "review_url": "https://shop.example/review/1001",
        }),
        "security_alert" => json!({
            "ip": "192.0.2.7",
            "location": "Berlin, DE",
            "occurred_at": "2026-11-22 14:05 CET",
        }),
        "marketing" => json!({
            "headline": "Winter sale",
            "body": "Everything 20% off.",
            "url": "https://shop.example/sale",
        }),
        other => panic!("no sample for {other}"),
    };
    match vars {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

#[test]
fn every_template_renders_all_four_parts_in_every_locale() {
    for def in catalog() {
        for locale in def.locales {
            let (content, used) = def.render(locale, "en", &sample(def.code)).unwrap();
            assert_eq!(used, *locale);
            let subject = content.subject.clone().unwrap();
            let html = content.html.clone().unwrap();
            let short = content.short.clone().unwrap();
            assert!(
                !subject.is_empty() && !subject.contains('\n'),
                "{subject:?}"
            );
            assert!(
                !short.is_empty() && short.chars().count() <= 320,
                "{short:?}"
            );
            assert!(html.starts_with("<!DOCTYPE html>"), "{}", def.code);
            assert!(
                html.contains("width=device-width"),
                "responsive: {}",
                def.code
            );
            assert!(!content.text.contains('<'), "plain text: {}", content.text);
            assert!(!content.text.contains("{{"), "{}", content.text);
        }
    }
}

#[test]
fn every_required_variable_is_named_when_missing() {
    for def in catalog() {
        for variable in def.variables.iter().filter(|v| v.required) {
            let mut vars = sample(def.code);
            vars.remove(variable.name);
            match def.render("en", "en", &vars) {
                Err(RenderError::MissingVariable { template, name }) => {
                    assert_eq!((template, name), (def.code, variable.name));
                }
                other => panic!(
                    "{}: expected missing {}, got {other:?}",
                    def.code, variable.name
                ),
            }
            vars.insert(variable.name.into(), Value::Null);
            assert!(
                matches!(
                    def.render("en", "en", &vars),
                    Err(RenderError::MissingVariable { .. })
                ),
                "null counts as missing"
            );
        }
    }
}

#[test]
fn the_message_names_the_missing_variable() {
    let mut vars = sample("order_shipped");
    vars.remove("tracking_number");
    let err = render("order_shipped", "en", "en", &vars)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "template order_shipped: missing variable `tracking_number`"
    );
}

#[test]
fn html_is_escaped_and_text_is_not() {
    let mut vars = sample("order_placed");
    vars.insert(
        "customer_name".into(),
        json!("<script>alert('x')</script> & Co"),
    );
    let (content, _) = render("order_placed", "en", "en", &vars).unwrap();
    let html = content.html.unwrap();
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"),
        "{html}"
    );
    assert!(content.text.contains("<script>alert('x')</script> & Co"));
}

#[test]
fn a_campaign_body_keeps_its_paragraphs_and_line_breaks_in_html() {
    let mut vars = sample("marketing");
    vars.insert(
        "body".into(),
        json!("Big <sale>\nthis week\n\nTea & cake\r\n\r\n\nSee you"),
    );
    let (content, _) = render("marketing", "en", "en", &vars).unwrap();
    let html = content.html.unwrap();
    assert!(
        html.contains("<p>Big &#60;sale&#62;<br/>this week</p><p>Tea &#38; cake</p><p>See you</p>"),
        "{html}"
    );
    assert!(content.text.contains("Big <sale>\nthis week\n\nTea & cake"));
}

#[test]
fn values_of_the_wrong_type_and_bad_links_are_errors() {
    let mut vars = sample("order_placed");
    vars.insert("total".into(), json!(42));
    let err = render("order_placed", "en", "en", &vars).unwrap_err();
    assert!(matches!(err, RenderError::InvalidVariable { .. }), "{err}");
    // The error names the variable, for the reason and for the API's `field`.
    let mut vars = sample("order_placed");
    vars.insert("order_number".into(), json!(1001));
    let err = render("order_placed", "en", "en", &vars).unwrap_err();
    assert!(err.to_string().contains("order_number"), "{err}");
    assert!(
        matches!(&err, RenderError::InvalidVariable { name: Some(name), .. } if name == "order_number"),
        "{err:?}"
    );
    let mut vars = sample("marketing");
    vars.insert("url".into(), json!("javascript:alert(1)"));
    let err = render("marketing", "en", "en", &vars)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`url`"), "{err}");
}

#[test]
fn locales_fall_back_from_region_to_language_to_default() {
    let shipped = find("order_shipped").unwrap();
    assert_eq!(shipped.resolve_locale("de-DE", "en"), "de");
    assert_eq!(shipped.resolve_locale("DE_at", "en"), "de");
    assert_eq!(shipped.resolve_locale("de", "en"), "de");
    assert_eq!(shipped.resolve_locale("fr-FR", "en"), "en");
    assert_eq!(shipped.resolve_locale("", "en"), "en");
    let delivered = find("order_delivered").unwrap();
    assert_eq!(
        delivered.resolve_locale("de-DE", "en"),
        "en",
        "no German variant"
    );
    assert_eq!(
        shipped.resolve_locale("fr-FR", "de-AT"),
        "de",
        "a locale the template lacks falls back to the configured default"
    );
    assert_eq!(shipped.resolve_locale("", "de"), "de");
    assert_eq!(
        delivered.resolve_locale("fr", "de"),
        "en",
        "no default variant"
    );

    let (german, used) = render("order_shipped", "de-DE", "en", &sample("order_shipped")).unwrap();
    assert_eq!(used, "de");
    assert!(german.subject.unwrap().contains("versandt"));
    assert!(
        german.text.contains("Sendungsnummer: 1Z999AA1"),
        "{}",
        german.text
    );
    let (english, _) = render("order_shipped", "fr", "en", &sample("order_shipped")).unwrap();
    assert!(
        english.text.contains("Tracking number: 1Z999AA1"),
        "{}",
        english.text
    );
}

#[test]
fn optional_variables_leave_no_trace_when_absent() {
    let mut vars = sample("order_shipped");
    vars.remove("delivery_estimate");
    vars.remove("customer_name");
    let (content, _) = render("order_shipped", "en", "en", &vars).unwrap();
    assert!(content.text.starts_with("Hello,"), "{}", content.text);
    assert!(
        !content.text.contains("Expected delivery"),
        "{}",
        content.text
    );
    assert!(!content.short.unwrap().contains("expected"));
}

#[test]
fn unknown_templates_are_named() {
    let err = render("order_refunded", "en", "en", &Map::new()).unwrap_err();
    assert!(matches!(err, RenderError::UnknownTemplate(code) if code == "order_refunded"));
}
