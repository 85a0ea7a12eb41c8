//! The sandbox runtime templates render in: minijinja without a loader (a template cannot read a
//! file or include another template), strict undefined variables, a fuel budget that bounds the
//! instructions one render may execute, and a cap on the bytes each part may produce. HTML is
//! escaped in the HTML part only.

use std::collections::BTreeSet;
use std::io::{self, Write};

use herald_nats::Content;
use minijinja::value::Rest;
use minijinja::{
    AutoEscape, Environment, ErrorKind, State, UndefinedBehavior, Value as JinjaValue,
};
use serde_json::{Map, Value};

/// Longest source accepted for one part.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;

/// How much one render may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Instructions one render of one part may execute (minijinja fuel).
    pub fuel: u64,
    /// Bytes one part may produce.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 50_000,
            max_output_bytes: 256 * 1024,
        }
    }
}

/// One part of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// Email subject, push title (one line).
    Subject,
    /// Plain text.
    Text,
    /// HTML email (auto-escaped).
    Html,
    /// Short text for SMS, Telegram and push (one line).
    Short,
}

impl Part {
    /// Its name in errors and in the API (`subject`, `text`, `html`, `short`).
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Subject => "subject",
            Part::Text => "text",
            Part::Html => "html",
            Part::Short => "short",
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sources of one locale variant; only `text` is required.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    /// Subject source.
    pub subject: Option<&'a str>,
    /// Plain-text source.
    pub text: &'a str,
    /// HTML source.
    pub html: Option<&'a str>,
    /// Short-text source.
    pub short: Option<&'a str>,
}

impl<'a> Sources<'a> {
    fn parts(&self) -> impl Iterator<Item = (Part, &'a str)> {
        [
            (Part::Subject, self.subject),
            (Part::Text, Some(self.text)),
            (Part::Html, self.html),
            (Part::Short, self.short),
        ]
        .into_iter()
        .filter_map(|(part, source)| source.map(|s| (part, s)))
    }
}

/// Why a runtime template did not compile or render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The source does not parse.
    #[error("{part}: syntax error on line {line}: {message}")]
    Syntax {
        /// The part at fault.
        part: Part,
        /// Its line (1-based).
        line: usize,
        /// The parser's reason.
        message: String,
    },
    /// A source is larger than [`MAX_SOURCE_BYTES`].
    #[error("{part}: source is longer than {MAX_SOURCE_BYTES} bytes")]
    SourceTooLarge {
        /// The part at fault.
        part: Part,
    },
    /// A variable the template uses was not given.
    #[error("missing variable `{name}` (used in {part})")]
    MissingVariable {
        /// The part that used it.
        part: Part,
        /// The variable (top-level name, or the path when an attribute is missing).
        name: String,
    },
    /// The render ran out of fuel (a loop too long, or endless).
    #[error("{part}: rendering took too many steps (limit {fuel}); simplify the template")]
    OutOfFuel {
        /// The part at fault.
        part: Part,
        /// The fuel it had.
        fuel: u64,
    },
    /// The render produced more than the output cap.
    #[error("{part}: rendered output exceeds {limit} bytes")]
    OutputTooLarge {
        /// The part at fault.
        part: Part,
        /// The cap.
        limit: usize,
    },
    /// Any other engine error (a filter given a wrong type, a bad operation).
    #[error("{part}: {message}")]
    Engine {
        /// The part at fault.
        part: Part,
        /// The engine's message, with its line.
        message: String,
    },
}

impl SandboxError {
    /// The part the error is about.
    pub fn part(&self) -> Part {
        match self {
            SandboxError::Syntax { part, .. }
            | SandboxError::SourceTooLarge { part }
            | SandboxError::MissingVariable { part, .. }
            | SandboxError::OutOfFuel { part, .. }
            | SandboxError::OutputTooLarge { part, .. }
            | SandboxError::Engine { part, .. } => *part,
        }
    }
}

/// The sandboxed environment: no loader, strict undefined, fuel, HTML escaping for `html` only,
/// and a `null` value taken as absent ([`null_is_absent`]).
fn environment(limits: Limits) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    null_is_absent(&mut env);
    env.set_fuel(Some(limits.fuel));
    env.set_auto_escape_callback(|name| {
        if name == Part::Html.as_str() {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

/// A client that writes an empty optional field as `null` means it is absent, so `is defined` is
/// false for a `null` (and `is undefined` true), `default` replaces it, and printing one is a
/// missing variable (named as such) rather than the text `none`. A `null` stays a value otherwise:
/// `{% if x %}` and `x is none` test it without the error strict undefined gives an absent one.
fn null_is_absent(env: &mut Environment<'static>) {
    env.add_test("defined", |value: &JinjaValue| !absent(value));
    env.add_test("undefined", |value: &JinjaValue| absent(value));
    env.add_filter("default", default_of_absent);
    env.add_filter("d", default_of_absent);
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            return Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "a null value is not printed",
            ));
        }
        minijinja::escape_formatter(out, state, value)
    });
}

/// Undefined, or `null`.
fn absent(value: &JinjaValue) -> bool {
    value.is_undefined() || value.is_none()
}

/// minijinja's `default` filter, for which a `null` is absent too.
fn default_of_absent(
    state: &State,
    value: &JinjaValue,
    args: Rest<JinjaValue>,
) -> Result<JinjaValue, minijinja::Error> {
    let value = if value.is_none() {
        &JinjaValue::UNDEFINED
    } else {
        value
    };
    minijinja::filters::default(state, value, args)
}

/// A locale variant's parts, compiled once and rendered many times. Each part has its own
/// environment holding only itself, so one part cannot include another.
pub struct Compiled {
    parts: Vec<(Part, Environment<'static>)>,
    limits: Limits,
}

impl Compiled {
    /// Compiles every part under `limits`.
    pub fn new(sources: &Sources<'_>, limits: Limits) -> Result<Self, SandboxError> {
        let mut parts = Vec::new();
        for (part, source) in sources.parts() {
            if source.len() > MAX_SOURCE_BYTES {
                return Err(SandboxError::SourceTooLarge { part });
            }
            let mut env = environment(limits);
            env.add_template_owned(part.as_str(), source.to_string())
                .map_err(|e| syntax(part, &e))?;
            parts.push((part, env));
        }
        Ok(Self { parts, limits })
    }

    /// The variables the parts use (top-level names, sorted).
    pub fn variables(&self) -> Vec<String> {
        let mut variables = BTreeSet::new();
        for (part, env) in &self.parts {
            if let Ok(template) = env.get_template(part.as_str()) {
                variables.extend(template.undeclared_variables(false));
            }
        }
        variables.into_iter().collect()
    }

    /// Renders every part with `vars`; subject and short text are made single lines.
    pub fn render(&self, vars: &Map<String, Value>) -> Result<Content, SandboxError> {
        let one_line = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut content = Content::default();
        for (part, env) in &self.parts {
            let out = render_part(env, *part, vars, self.limits)?;
            match part {
                Part::Subject => content.subject = Some(one_line(out)),
                Part::Text => content.text = out,
                Part::Html => content.html = Some(out),
                Part::Short => content.short = Some(one_line(out)),
            }
        }
        Ok(content)
    }
}

/// Compiles every part; returns the variables the template uses (top-level names, sorted).
pub fn compile(sources: &Sources<'_>) -> Result<Vec<String>, SandboxError> {
    Ok(Compiled::new(sources, Limits::default())?.variables())
}

/// Compiles and renders every part with `vars`.
pub fn render(
    sources: &Sources<'_>,
    vars: &Map<String, Value>,
    limits: Limits,
) -> Result<Content, SandboxError> {
    Compiled::new(sources, limits)?.render(vars)
}

fn render_part(
    env: &Environment<'static>,
    part: Part,
    vars: &Map<String, Value>,
    limits: Limits,
) -> Result<String, SandboxError> {
    let template = env
        .get_template(part.as_str())
        .map_err(|e| syntax(part, &e))?;
    let mut out = CappedWriter::new(limits.max_output_bytes);
    match template.render_captured_to(vars, &mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out.buffer).into_owned()),
        Err(_) if out.overflowed => Err(SandboxError::OutputTooLarge {
            part,
            limit: limits.max_output_bytes,
        }),
        Err(e) => Err(runtime(part, &e, &template, vars, limits)),
    }
}

fn syntax(part: Part, err: &minijinja::Error) -> SandboxError {
    SandboxError::Syntax {
        part,
        line: err.line().unwrap_or(1),
        message: err.detail().unwrap_or("invalid template").to_string(),
    }
}

/// Classifies a render error; a missing variable is named (the first the template uses that the
/// variables lack, else the engine's description of the missing attribute).
fn runtime(
    part: Part,
    err: &minijinja::Error,
    template: &minijinja::Template<'_, '_>,
    vars: &Map<String, Value>,
    limits: Limits,
) -> SandboxError {
    match err.kind() {
        ErrorKind::OutOfFuel => SandboxError::OutOfFuel {
            part,
            fuel: limits.fuel,
        },
        ErrorKind::UndefinedError => {
            let mut used: Vec<String> = template.undeclared_variables(false).into_iter().collect();
            used.sort();
            let name = used
                .into_iter()
                .find(|name| vars.get(name).is_none_or(Value::is_null))
                .unwrap_or_else(|| described(err));
            SandboxError::MissingVariable { part, name }
        }
        _ => SandboxError::Engine {
            part,
            message: described(err),
        },
    }
}

fn described(err: &minijinja::Error) -> String {
    let what = err
        .detail()
        .map_or_else(|| err.kind().to_string(), str::to_string);
    match err.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

/// Collects output up to a cap; past it, writes fail and `overflowed` is set.
struct CappedWriter {
    buffer: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl CappedWriter {
    fn new(cap: usize) -> Self {
        Self {
            buffer: Vec::new(),
            cap,
            overflowed: false,
        }
    }
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buffer.len() + data.len() > self.cap {
            self.overflowed = true;
            return Err(io::Error::other("rendered output too large"));
        }
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn text(source: &str) -> Sources<'_> {
        Sources {
            text: source,
            ..Sources::default()
        }
    }

    #[test]
    fn renders_all_parts_and_escapes_html_only_in_the_html_part() {
        let sources = Sources {
            subject: Some("Order {{ order }}\n shipped"),
            text: "Hi {{ name }}, order {{ order }}.",
            html: Some("<p>Hi {{ name }}</p>"),
            short: Some("Order {{ order }}"),
        };
        let content = render(
            &sources,
            &vars(json!({"name": "<b>Ada</b> & co", "order": "A-1"})),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(content.subject.as_deref(), Some("Order A-1 shipped"));
        assert_eq!(content.text, "Hi <b>Ada</b> & co, order A-1.");
        assert_eq!(
            content.html.as_deref(),
            Some("<p>Hi &lt;b&gt;Ada&lt;&#x2f;b&gt; &amp; co</p>")
        );
        assert_eq!(content.short.as_deref(), Some("Order A-1"));
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_it() {
        let err = render(
            &text("Hello {{ name }}, your order {{ order_number }}"),
            &vars(json!({"name": "Ada"})),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SandboxError::MissingVariable {
                part: Part::Text,
                name: "order_number".into()
            }
        );
        assert!(err.to_string().contains("`order_number`"), "{err}");
    }

    #[test]
    fn a_null_value_counts_as_absent_at_any_depth() {
        let render_text =
            |source: &str, values: Value| render(&text(source), &vars(values), Limits::default());
        let content = render_text(
            "{% if coupon is defined %}{{ coupon }}{% else %}-{% endif %} {{ note | default('n/a') }} \
             {{ note | d('none given') }} {% if order.coupon is defined %}{{ order.coupon }}{% endif %}\
             {{ order.number }} {% if coupon %}yes{% else %}no{% endif %} \
             {% if coupon is none %}null{% endif %} {% if note is undefined %}absent{% endif %}",
            json!({"coupon": null, "note": null, "order": {"coupon": null, "number": 7}}),
        )
        .unwrap();
        assert_eq!(content.text, "- n/a none given 7 no null absent");
        let err = render_text("Hello {{ name }}", json!({"name": null})).unwrap_err();
        assert!(
            matches!(&err, SandboxError::MissingVariable { name, .. } if name == "name"),
            "{err:?}"
        );
        let html = render(
            &Sources {
                html: Some("<b>{{ name }}</b>"),
                ..text("-")
            },
            &vars(json!({"name": "<Ada>"})),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(
            html.html.as_deref(),
            Some("<b>&lt;Ada&gt;</b>"),
            "still escaped"
        );
    }

    #[test]
    fn a_missing_attribute_is_an_error_too_and_defined_tests_still_work() {
        let err = render(
            &text("{{ order.number }}"),
            &vars(json!({"order": {}})),
            Limits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::MissingVariable {
                    part: Part::Text,
                    ..
                }
            ),
            "{err:?}"
        );
        let content = render(
            &text("{% if coupon is defined %}{{ coupon }}{% else %}none{% endif %}"),
            &Map::new(),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(content.text, "none");
    }

    #[test]
    fn syntax_errors_name_the_part_and_line() {
        let sources = Sources {
            html: Some("<p>\n{% if x %}\nunclosed"),
            ..text("fine")
        };
        match compile(&sources).unwrap_err() {
            SandboxError::Syntax { part, line, .. } => {
                assert_eq!(part, Part::Html);
                assert!(line >= 2, "line {line}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn compile_lists_the_variables_used() {
        let sources = Sources {
            subject: Some("{{ order_number }}"),
            text: "{% for i in items %}{{ i.name }}{% endfor %} {{ customer_name }}",
            html: None,
            short: None,
        };
        assert_eq!(
            compile(&sources).unwrap(),
            vec!["customer_name", "items", "order_number"]
        );
    }

    #[test]
    fn an_endless_loop_runs_out_of_fuel() {
        let limits = Limits {
            fuel: 10_000,
            max_output_bytes: usize::MAX,
        };
        let err = render(
            &text("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"),
            &Map::new(),
            limits,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SandboxError::OutOfFuel {
                part: Part::Text,
                fuel: 10_000
            }
        );
    }

    #[test]
    fn huge_output_is_cut_off_with_an_error() {
        let limits = Limits {
            fuel: 1_000_000,
            max_output_bytes: 1_000,
        };
        let err = render(
            &text("{% for i in range(1000) %}{{ word }}{% endfor %}"),
            &vars(json!({"word": "0123456789"})),
            limits,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SandboxError::OutputTooLarge {
                part: Part::Text,
                limit: 1_000
            }
        );
    }

    #[test]
    fn templates_cannot_read_files_or_other_templates() {
        let err = render(
            &text("{% include '/etc/passwd' %}"),
            &Map::new(),
            Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, SandboxError::Engine { .. }), "{err:?}");
    }

    #[test]
    fn oversized_sources_are_refused() {
        let big = "x".repeat(MAX_SOURCE_BYTES + 1);
        assert_eq!(
            compile(&text(&big)).unwrap_err(),
            SandboxError::SourceTooLarge { part: Part::Text }
        );
    }
}
