//! Chat templates rendered with minijinja as transformers 5 renders them
//! (`utils/chat_template_utils.py`): `trim_blocks` and `lstrip_blocks` on, loop controls, and
//! the context `messages`, `tools`, `documents`, `add_generation_prompt`, the named special
//! tokens and any per-row `chat_template_kwargs`; `raise_exception(msg)`,
//! `strftime_now(fmt)` (of `--template-date`, so reruns give the same ids) and a `tojson` that is
//! Python's `json.dumps` (`ensure_ascii`, `indent`, `separators`, `sort_keys`). Messages keep
//! every key they have (keys whose value is null are dropped, as transformers drops them), and
//! reasoning given as `reasoning_content`, `thinking` or `reasoning` is passed under the first
//! two names, as transformers aliases it.
use super::input::Message;
use anyhow::{bail, Context, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A calendar date, for `strftime_now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        let bad = || anyhow::anyhow!("`{s}` is not a date YYYY-MM-DD");
        let [y, m, d] = parts.as_slice() else { return Err(bad()) };
        let d = Date { year: y.parse().map_err(|_| bad())?, month: m.parse().map_err(|_| bad())?, day: d.parse().map_err(|_| bad())? };
        if !(1..=12).contains(&d.month) || d.day < 1 || d.day > days_in_month(d.year, d.month) {
            return Err(bad());
        }
        Ok(d)
    }

    /// Today in UTC.
    pub fn today() -> Self {
        let days = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) / 86_400) as i64;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Date { year, month, day }
    }

    fn day_of_year(self) -> u32 {
        (1..self.month).map(|m| days_in_month(self.year, m)).sum::<u32>() + self.day
    }

    /// 0 = Monday.
    fn weekday(self) -> u32 {
        // Zeller-style count from a known Monday (0001-01-01 in the proleptic Gregorian calendar).
        let y = (self.year - 1) as i64;
        let days = y * 365 + y / 4 - y / 100 + y / 400 + self.day_of_year() as i64 - 1;
        days.rem_euclid(7) as u32
    }

    /// Python's `strftime` (C locale) of this date at midnight; glibc's `%-d` style too.
    pub fn strftime(self, fmt: &str) -> Result<String, String> {
        const MONTHS: [&str; 12] =
            ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
        const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut spec = chars.next().ok_or("strftime: format ends with %")?;
            let pad = spec != '-';
            if !pad {
                spec = chars.next().ok_or("strftime: format ends with %-")?;
            }
            let num = |v: u32, width: usize| if pad { format!("{v:0width$}") } else { v.to_string() };
            let (month, weekday) = (MONTHS[self.month as usize - 1], DAYS[self.weekday() as usize]);
            out += &match spec {
                'd' => num(self.day, 2),
                'e' => format!("{:>2}", self.day),
                'm' => num(self.month, 2),
                'y' => num(self.year.rem_euclid(100) as u32, 2),
                'Y' => self.year.to_string(),
                'j' => num(self.day_of_year(), 3),
                'b' | 'h' => month[..3].to_string(),
                'B' => month.to_string(),
                'a' => weekday[..3].to_string(),
                'A' => weekday.to_string(),
                'u' => (self.weekday() + 1).to_string(),
                'w' => ((self.weekday() + 1) % 7).to_string(),
                'H' | 'M' | 'S' | 'I' => {
                    if spec == 'I' {
                        num(12, 2)
                    } else {
                        num(0, 2)
                    }
                }
                'p' => "AM".into(),
                'F' => format!("{:04}-{:02}-{:02}", self.year, self.month, self.day),
                'D' => format!("{:02}/{:02}/{:02}", self.month, self.day, self.year.rem_euclid(100)),
                '%' => "%".into(),
                other => return Err(format!("strftime_now: unsupported format code %{other}")),
            };
        }
        Ok(out)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month as usize - 1]
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// A model's chat templates: one (`default`), or several by name (`default`, `tool_use`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSource {
    /// Where they came from (for manifests and errors).
    pub path: PathBuf,
    pub templates: BTreeMap<String, String>,
}

impl TemplateSource {
    /// The text that identifies the templates (hashed into fingerprints).
    pub fn identity(&self) -> String {
        self.templates.iter().map(|(k, v)| format!("{}\0{k}\0{v}", k.len())).collect()
    }

    /// Whether any template asks for the date: then `--template-date` changes the ids.
    pub fn uses_date(&self) -> bool {
        self.templates.values().any(|t| t.contains("strftime_now"))
    }
}

/// Where the templates live, as transformers 5 reads them: `chat_template.jinja` (and
/// `additional_chat_templates/NAME.jinja`), else tokenizer_config.json's `chat_template` (a
/// string, or a list of `{name, template}`).
pub fn template_source(model_dir: &Path, tokenizer_config: &Json) -> Result<Option<TemplateSource>> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let jinja = model_dir.join("chat_template.jinja");
    let mut templates = BTreeMap::new();
    if jinja.exists() {
        templates.insert("default".to_string(), read(&jinja)?);
    }
    let extra = model_dir.join("additional_chat_templates");
    if extra.is_dir() {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&extra)?.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.extension().is_some_and(|x| x == "jinja")).collect();
        files.sort();
        for f in files {
            let name = f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            templates.insert(name, read(&f)?);
        }
    }
    if !templates.is_empty() {
        return Ok(Some(TemplateSource { path: jinja, templates }));
    }
    let path = model_dir.join("tokenizer_config.json");
    match tokenizer_config.get("chat_template") {
        Some(Json::String(s)) => templates.insert("default".into(), s.clone()),
        Some(Json::Array(list)) => {
            for t in list {
                let (Some(name), Some(text)) = (t.get("name").and_then(Json::as_str), t.get("template").and_then(Json::as_str)) else {
                    bail!("{}: `chat_template` list entries need `name` and `template`", path.display());
                };
                templates.insert(name.into(), text.into());
            }
            None
        }
        _ => return Ok(None),
    };
    Ok(Some(TemplateSource { path, templates }))
}

pub struct ChatTemplate {
    env: Environment<'static>,
    names: Vec<String>,
    special_tokens: BTreeMap<String, String>,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn op_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, e.to_string())
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// the filter transformers installs (minijinja's own `tojson` escapes HTML characters).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v: Json = serde_json::to_value(&value).map_err(op_error)?;
    let indent = match indent {
        None => None,
        Some(i) if i.is_none() || i.is_undefined() => None,
        Some(i) => Some(match i.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(i).map_err(op_error)?),
        }),
    };
    let (item, key) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(op_error("tojson: separators must be a pair")),
        None => (if indent.is_some() { ",".into() } else { ", ".into() }, ": ".into()),
    };
    let mut out = String::new();
    py_dumps(&v, &PyJson { indent, item, key, sort_keys: sort_keys.unwrap_or(false), ascii: ensure_ascii.unwrap_or(false) }, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ascii: bool,
}

fn py_string(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn py_dumps(v: &Json, f: &PyJson, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &f.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
    };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, depth + 1);
                py_dumps(x, f, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if f.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, depth + 1);
                py_string(k, f.ascii, out);
                out.push_str(&f.key);
                py_dumps(x, f, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Json::Array(_) => out.push_str("[]"),
        Json::Object(_) => out.push_str("{}"),
        Json::String(s) => py_string(s, f.ascii, out),
        Json::Number(n) if n.is_f64() => {
            // Python writes floats with a decimal point or an exponent ("1.0", "1e-05").
            let x = n.as_f64().unwrap_or(0.0);
            out.push_str(&if x.is_finite() && x == x.trunc() && x.abs() < 1e16 { format!("{x:.1}") } else { python_float(x) });
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Python's repr of a float that is not a small whole number.
fn python_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let s = format!("{x:e}"); // shortest digits, as "1.5e-5"
    let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        format!("{x}")
    } else {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// A message as the template sees it: null-valued keys dropped, reasoning aliased.
fn template_message(m: &Message) -> Json {
    let mut out = serde_json::Map::new();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| m.0.get(*k).filter(|v| !v.is_null())).cloned();
    if let Some(r) = &reasoning {
        out.insert("thinking".into(), r.clone());
    }
    for (k, v) in &m.0 {
        if !v.is_null() {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Some(r) = reasoning {
        out.insert("reasoning_content".into(), r);
    }
    Json::Object(out)
}

impl ChatTemplate {
    pub fn new(source: &TemplateSource, special_tokens: BTreeMap<String, String>, date: Date) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", move |fmt: String| -> Result<Value, Error> { date.strftime(&fmt).map(Value::from).map_err(op_error) });
        env.add_filter("tojson", tojson);
        for (name, text) in &source.templates {
            env.add_template_owned(name.clone(), text.clone()).with_context(|| format!("chat template `{name}` does not parse"))?;
        }
        Ok(Self { env, names: source.templates.keys().cloned().collect(), special_tokens })
    }

    /// Renders `messages`; `tools` (a list of JSON schemas) and `kwargs` (a row's
    /// `chat_template_kwargs`) as TRL passes them. Errors are the template's message.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&Json>,
        kwargs: Option<&serde_json::Map<String, Json>>,
    ) -> Result<String, String> {
        // transformers: with several templates, `tool_use` when tools are given, else `default`.
        let name = if self.names.len() == 1 {
            self.names[0].as_str()
        } else if tools.is_some() && self.names.iter().any(|n| n == "tool_use") {
            "tool_use"
        } else if self.names.iter().any(|n| n == "default") {
            "default"
        } else {
            return Err(format!("this model has several chat templates ({}) and none named `default`", self.names.join(", ")));
        };
        let tmpl = self.env.get_template(name).expect("added in new");
        let mut ctx: serde_json::Map<String, Json> = self.special_tokens.iter().map(|(k, v)| (k.clone(), Json::from(v.clone()))).collect();
        ctx.extend(kwargs.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
        ctx.insert("messages".into(), Json::Array(messages.iter().map(template_message).collect()));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::from(add_generation_prompt));
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("template raised an exception").to_string(),
            _ => e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_python_strftime() {
        let d = Date::parse("2026-03-05").unwrap();
        assert_eq!(d.strftime("%d %b %Y").unwrap(), "05 Mar 2026");
        assert_eq!(d.strftime("%A %-d %B %y, day %j").unwrap(), "Thursday 5 March 26, day 064");
        assert_eq!(Date::parse("2024-02-29").unwrap().strftime("%a %F").unwrap(), "Thu 2024-02-29");
        assert!(Date::parse("2023-02-29").is_err());
        assert!(Date::today().year >= 2024);
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let v = Value::from_serialize(serde_json::json!({"b": [1, 2.5, "é\n"], "a": {}, "c": 1e-5, "d": 3.0}));
        let s = |k: Kwargs| tojson(v.clone(), k).unwrap().to_string();
        assert_eq!(s(Kwargs::from_iter(Vec::<(String, Value)>::new())), r#"{"b": [1, 2.5, "é\n"], "a": {}, "c": 1e-05, "d": 3.0}"#);
        assert_eq!(
            s(Kwargs::from_iter([("indent", Value::from(2)), ("sort_keys", Value::from(true))])),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\"\n  ],\n  \"c\": 1e-05,\n  \"d\": 3.0\n}"
        );
        assert_eq!(s(Kwargs::from_iter([("ensure_ascii", Value::from(true))])), r#"{"b": [1, 2.5, "\u00e9\n"], "a": {}, "c": 1e-05, "d": 3.0}"#);
    }
}
