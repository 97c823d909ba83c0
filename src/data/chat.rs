//! Chat templates rendered with minijinja in Hugging Face's Jinja dialect: the template sees
//! `messages`, `add_generation_prompt`, the special tokens and `raise_exception(msg)`, with
//! `trim_blocks` and `lstrip_blocks` on, as transformers sets them.
use super::input::Message;
use anyhow::{Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: BTreeMap<String, String>,
    /// The template text, hashed into the fingerprint.
    pub source: String,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python's `json.dumps(ensure_ascii=False)`, which HF templates expect (minijinja's own
/// `tojson` escapes HTML characters).
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, Error> {
    let v: serde_json::Value = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let s = match indent {
        Some(n) => {
            let mut buf = Vec::new();
            let ind = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&v, &mut ser).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(buf).unwrap()
        }
        None => {
            let mut out = String::new();
            py_dumps(&v, &mut out);
            out
        }
    };
    Ok(Value::from_safe_string(s))
}

/// `json.dumps` with its default separators `", "` and `": "`.
fn py_dumps(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_dumps(x, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(": ");
                py_dumps(x, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Where the template lives and its text: `chat_template.jinja` (transformers 5) or
/// tokenizer_config.json's `chat_template` (a string, or a list of named templates: `default`).
pub fn template_source(model_dir: &Path, tokenizer_config: &serde_json::Value) -> Result<(PathBuf, Option<String>)> {
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok((jinja, Some(text)));
    }
    let source = match tokenizer_config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    };
    Ok((model_dir.join("tokenizer_config.json"), source))
}

impl ChatTemplate {
    pub fn new(source: String, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |_fmt: String| -> Result<Value, Error> { Ok(Value::from("")) });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone()).context("chat template does not parse")?;
        Ok(Self { env, special_tokens, source })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        let mut ctx: BTreeMap<String, Value> = self.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        tmpl.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("template raised an exception").to_string(),
            _ => e.to_string(),
        })
    }
}
