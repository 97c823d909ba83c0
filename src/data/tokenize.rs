//! Tokenization with HF TRL 1.16 DPOTrainer's conventions (see README "Tokenization rules"):
//! EOS text appended to plain-text completions, joint encodings of prompt+completion, the
//! prompt cut to the longest common prefix with both, per-sequence `max_length` truncation.
use super::chat::{ChatTemplate, Date, TemplateSource};
use super::hf_tokenizer::{self, Built, TokenizerFiles};
use super::input::{Field, Message, RawRow, Skip, UnpairedRow};
use crate::store::{InputRef, Manifest};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// A tokenized pair. Ids are stored before truncation, as TRL stores them; `*_scored` is how
/// many completion tokens survive `max_length` and are scored by later stages.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPair {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub chosen_scored: u32,
    pub rejected_scored: u32,
}

/// The tokenizer side of a model directory, as transformers builds it (see `hf_tokenizer`).
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    pub eos_token: Option<String>,
    pub template: Option<ChatTemplate>,
    /// Which construction transformers uses for these files (`LlamaTokenizer`, `tokenizer.json as is`, ...).
    pub construction: String,
    /// Whether the chat template calls `strftime_now` (then the date is part of the ids).
    pub template_uses_date: bool,
    /// What decides the token ids, part by part (see [`tokenizer_identity`]).
    pub identity: Vec<InputRef>,
}

/// Role of the built tokenizer among a stage's inputs: the vocabulary, merges, added tokens and
/// pipeline as transformers builds them, i.e. what the ids mean.
pub const TOKENIZER_ROLE: &str = "tokenizer";

fn hash_json(v: &serde_json::Value) -> String {
    blake3::hash(crate::store::manifest::canonical_json(v).as_bytes()).to_hex().to_string()
}

/// The built tokenizer as JSON (what `check_same_tokenizer` compares section by section).
fn built_json(b: &Built) -> Result<serde_json::Value> {
    let text = b.tokenizer.to_string(false).map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["construction"] = b.construction.clone().into();
    Ok(v)
}

/// The parts as stage inputs: `tokenizer` (the built tokenizer, hashed as canonical JSON so the
/// file's formatting does not matter but its construction does), `special_tokens` and `chat_template`.
fn identity(files: &TokenizerFiles, built: &Built, template: Option<&TemplateSource>) -> Result<Vec<InputRef>> {
    let template_path = template.map_or_else(|| files.cfg_path.clone(), |t| t.path.clone());
    Ok(vec![
        InputRef::new(TOKENIZER_ROLE, &files.tok_path, &hash_json(&built_json(built)?)),
        InputRef::new("special_tokens", &files.cfg_path, &hash_json(&serde_json::to_value(&built.special_tokens)?)),
        InputRef::new("chat_template", &template_path, blake3::hash(template.map(|t| t.identity()).unwrap_or_default().as_bytes()).to_hex().as_ref()),
    ])
}

/// The parts of a model directory that decide how text becomes ids, as stage inputs.
pub fn tokenizer_identity(model_dir: &Path) -> Result<Vec<InputRef>> {
    let files = TokenizerFiles::read(model_dir)?;
    let built = hf_tokenizer::build(&files)?;
    identity(&files, &built, super::chat::template_source(model_dir, &files.cfg)?.as_ref())
}

/// Refuses a model whose tokenizer (as transformers builds it) differs from the one `prepared`
/// made its ids with: the same ids would then mean other text. Names the files and what in
/// them differs.
pub fn check_same_tokenizer(prepared: &Manifest, prepared_dir: &Path, model_dir: &Path) -> Result<()> {
    let want = prepared.input(TOKENIZER_ROLE).with_context(|| format!("{}: manifest", prepared_dir.display()))?;
    let files = TokenizerFiles::read(model_dir)?;
    let built = hf_tokenizer::build(&files)?;
    let have = built_json(&built)?;
    if hash_json(&have) == want.blake3 {
        return Ok(());
    }
    // Which sections differ, when the original directory still builds what prepare used.
    let original = Path::new(&want.path).parent().map(|d| TokenizerFiles::read(d).and_then(|f| built_json(&hf_tokenizer::build(&f)?)));
    let sections = match original {
        Some(Ok(a)) if hash_json(&a) == want.blake3 => {
            let keys: std::collections::BTreeSet<&String> = a.as_object().into_iter().chain(have.as_object()).flat_map(|o| o.keys()).collect();
            let differ: Vec<&str> = keys.into_iter().filter(|k| a.get(k.as_str()) != have.get(k.as_str())).map(|k| k.as_str()).collect();
            format!(" (sections that differ: {})", differ.join(", "))
        }
        _ => String::new(),
    };
    bail!(
        "{} has another tokenizer than the one {} was prepared with: {} (built as {}) differs from {}{sections}; \
         the prepared token ids would mean other text to this model. Prepare the data again with this model, \
         or use a model with the same tokenizer",
        model_dir.display(),
        prepared_dir.display(),
        files.tok_path.display(),
        built.construction,
        want.path
    )
}

impl ModelTokenizer {
    /// The model directory's tokenizer and chat template; `date` is what `strftime_now` gives.
    pub fn load(model_dir: &Path, date: Date) -> Result<Self> {
        let files = TokenizerFiles::read(model_dir)?;
        let built = hf_tokenizer::build(&files)?;
        let source = super::chat::template_source(model_dir, &files.cfg)?;
        let identity = identity(&files, &built, source.as_ref())?;
        let Built { mut tokenizer, construction, special_tokens } = built;
        // HF's tokenizer(text) without truncation/padding arguments turns both off.
        tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        tokenizer.with_padding(None);
        let eos_token = special_tokens.get("eos_token").cloned();
        let template = match &source {
            Some(s) => Some(ChatTemplate::new(s, special_tokens, date).with_context(|| format!("{}: chat template", model_dir.display()))?),
            None => None,
        };
        Ok(Self { tokenizer, eos_token, template, construction, template_uses_date: source.as_ref().is_some_and(|s| s.uses_date()), identity })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        // Encoding a plain string cannot fail with truncation and padding off.
        self.tokenizer.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }

    /// A conversation rendered with the chat template and tokenized as TRL does (no special
    /// tokens added beyond what the template writes).
    pub fn encode_chat(
        &self,
        msgs: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Vec<u32>, Skip> {
        let t = self.template.as_ref().ok_or_else(|| Skip::new("no_chat_template", "a conversation, and the model has no chat template"))?;
        Ok(self.encode(&t.render(msgs, add_generation_prompt, tools, kwargs).map_err(|e| Skip::new("template_error", e))?, false))
    }
}

/// Truncation settings: they change what is scored, so they are part of every fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
}

fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// TRL's `extract_prompt` for strings: split at the first differing character, giving a space
/// just before it to the completions. As in TRL, when one string is a prefix of the other the
/// split falls one character before the shorter one's end.
pub fn extract_text_prompt(chosen: &str, rejected: &str) -> Result<(String, String, String), Skip> {
    let c: Vec<char> = chosen.chars().collect();
    let r: Vec<char> = rejected.chars().collect();
    let n = c.len().min(r.len());
    let mut idx = match (0..n).find(|&i| c[i] != r[i]) {
        Some(i) => i,
        None => n.saturating_sub(1),
    };
    if idx > 0 && idx < n && c[idx] != r[idx] && c[idx - 1] == ' ' {
        idx -= 1;
    }
    if idx == 0 {
        return Err(Skip::new("no_common_prompt", "implicit prompt: chosen and rejected share no prefix"));
    }
    let s = |v: &[char]| v.iter().collect::<String>();
    Ok((s(&c[..idx]), s(&c[idx..]), s(&r[idx..])))
}

/// Prompt, chosen and rejected parts of a row.
pub type Triple<T> = (Vec<T>, Vec<T>, Vec<T>);

/// TRL's `extract_prompt` for conversations: the messages before the first differing one.
pub fn extract_messages_prompt(chosen: &[Message], rejected: &[Message]) -> Result<Triple<Message>, Skip> {
    let n = chosen.len().min(rejected.len());
    let idx = (0..n).find(|&i| chosen[i] != rejected[i]).unwrap_or(n.saturating_sub(1));
    if idx == 0 {
        return Err(Skip::new("no_common_prompt", "implicit prompt: chosen and rejected share no leading message"));
    }
    Ok((chosen[..idx].to_vec(), chosen[idx..].to_vec(), rejected[idx..].to_vec()))
}

/// A pair as two unpaired rows, chosen (label true) and rejected (false), the prompt
/// extracted first when implicit (TRL's `extract_prompt`, then `unpair_preference_dataset`).
pub fn unpair(row: RawRow) -> Result<[UnpairedRow; 2], Skip> {
    let (prompt, chosen, rejected) = match (row.prompt, row.chosen, row.rejected) {
        (Some(Field::Text(p)), Field::Text(c), Field::Text(r)) => (Field::Text(p), Field::Text(c), Field::Text(r)),
        (None, Field::Text(c), Field::Text(r)) => {
            let (p, c, r) = extract_text_prompt(&c, &r)?;
            (Field::Text(p), Field::Text(c), Field::Text(r))
        }
        (Some(Field::Messages(p)), Field::Messages(c), Field::Messages(r)) => (Field::Messages(p), Field::Messages(c), Field::Messages(r)),
        (None | Some(Field::Text(_)), Field::Messages(c), Field::Messages(r)) => {
            let (p, c, r) = extract_messages_prompt(&c, &r)?;
            (Field::Messages(p), Field::Messages(c), Field::Messages(r))
        }
        _ => return Err(Skip::new("mixed_formats", "prompt is a message list but chosen/rejected are strings")),
    };
    let half = |completion: Field, label: bool| UnpairedRow {
        source_row: row.source_row,
        prompt: prompt.clone(),
        completion,
        label,
        tools: row.tools.clone(),
        template_kwargs: row.template_kwargs.clone(),
    };
    Ok([half(chosen, true), half(rejected, false)])
}

/// An empty completion is a data error, not something to train on (TRL would score a lone EOS).
fn non_empty_text(chosen: &str, rejected: &str) -> Result<(), Skip> {
    for (name, text) in [("chosen", chosen), ("rejected", rejected)] {
        if text.is_empty() {
            return Err(Skip::new("empty_completion", format!("{name} is an empty string")));
        }
    }
    Ok(())
}

fn non_empty_messages(chosen: &[Message], rejected: &[Message]) -> Result<(), Skip> {
    for (name, msgs) in [("chosen", chosen), ("rejected", rejected)] {
        if let Some(i) = msgs.iter().position(Message::is_empty) {
            return Err(Skip::new("empty_completion", format!("{name}: completion message {i} has empty content")));
        }
    }
    Ok(())
}

/// Tokenizes rows; shared read-only across rayon threads.
pub struct Encoder<'a> {
    pub tok: &'a ModelTokenizer,
    pub truncation: Truncation,
}

impl Encoder<'_> {
    pub fn check_ready(&self, conversational: bool) -> Result<()> {
        if !conversational && self.tok.eos_token.is_none() {
            bail!("the tokenizer has no eos_token in tokenizer_config.json; plain-text rows need one (TRL appends it to completions)");
        }
        if conversational && self.tok.template.is_none() {
            bail!("conversational rows need a chat template, and the model has none (no `chat_template` in tokenizer_config.json, no chat_template.jinja)");
        }
        Ok(())
    }

    pub fn encode(&self, row: &RawRow) -> Result<EncodedPair, Skip> {
        if row.chosen == row.rejected {
            return Err(Skip::new("chosen_equals_rejected", "chosen and rejected are identical"));
        }
        let (prompt_ids, pc, pr) = match (&row.prompt, &row.chosen, &row.rejected) {
            (Some(Field::Text(p)), Field::Text(c), Field::Text(r)) => {
                non_empty_text(c, r)?;
                let (pc, pr) = self.text_joint(p, c, r);
                (self.tok.encode(p, true), pc, pr)
            }
            (None, Field::Text(c), Field::Text(r)) => {
                non_empty_text(c, r)?;
                let (p, c, r) = extract_text_prompt(c, r)?;
                let (pc, pr) = self.text_joint(&p, &c, &r);
                (self.tok.encode(&p, true), pc, pr)
            }
            (Some(Field::Messages(p)), Field::Messages(c), Field::Messages(r)) => {
                non_empty_messages(c, r)?;
                self.chat_joint(row, p, c, r)?
            }
            // No prompt column, or a string prompt beside conversational completions that
            // already contain it (TRL's maybe_extract_prompt): the prompt is the shared prefix.
            (None | Some(Field::Text(_)), Field::Messages(c), Field::Messages(r)) => {
                let (p, c, r) = extract_messages_prompt(c, r)?;
                non_empty_messages(&c, &r)?;
                self.chat_joint(row, &p, &c, &r)?
            }
            _ => return Err(Skip::new("mixed_formats", "prompt is a message list but chosen/rejected are strings")),
        };
        let split = common_prefix_len(&prompt_ids, &pc).min(common_prefix_len(&prompt_ids, &pr));
        let mut prompt_ids = prompt_ids;
        prompt_ids.truncate(split);
        let chosen_ids = pc[split..].to_vec();
        let rejected_ids = pr[split..].to_vec();
        if prompt_ids.is_empty() {
            return Err(Skip::new("empty_prompt", "the prompt has no tokens, so the first completion token has no context to be scored from"));
        }
        if chosen_ids.is_empty() || rejected_ids.is_empty() {
            return Err(Skip::new("empty_completion", "a completion has no tokens after the prompt"));
        }
        if let Some(m) = self.truncation.max_prompt_length {
            if prompt_ids.len() > m {
                prompt_ids.drain(..prompt_ids.len() - m);
            }
            if prompt_ids.is_empty() {
                return Err(Skip::new("empty_prompt", "no prompt token is left after max_prompt_length"));
            }
        }
        let room = self.room(&prompt_ids)?;
        Ok(EncodedPair {
            chosen_scored: chosen_ids.len().min(room) as u32,
            rejected_scored: rejected_ids.len().min(room) as u32,
            prompt_ids,
            chosen_ids,
            rejected_ids,
        })
    }

    /// An unpaired row as TRL 1.16's KTOTrainer tokenizes it: prompt and prompt+completion
    /// encoded jointly, the prompt cut to their common prefix; the sequence cut to max_length
    /// (prompts of max_length tokens or more dropped). Returned as a pair with no rejected side.
    pub fn encode_unpaired(&self, row: &UnpairedRow) -> Result<EncodedPair, Skip> {
        let (prompt_ids, pc) = match (&row.prompt, &row.completion) {
            (Field::Text(p), Field::Text(c)) => {
                if c.is_empty() {
                    return Err(Skip::new("empty_completion", "completion is an empty string"));
                }
                let eos = self.tok.eos_token.as_deref().unwrap_or("");
                let c = if c.ends_with(eos) { c.clone() } else { format!("{c}{eos}") };
                (self.tok.encode(p, true), self.tok.encode(&format!("{p}{c}"), true))
            }
            (Field::Messages(p), Field::Messages(c)) => {
                if let Some(i) = c.iter().position(Message::is_empty) {
                    return Err(Skip::new("empty_completion", format!("completion message {i} has empty content")));
                }
                let enc = |msgs: &[Message], gen: bool| self.tok.encode_chat(msgs, gen, row.tools.as_ref(), row.template_kwargs.as_ref());
                (enc(p, true)?, enc(&[p.as_slice(), c.as_slice()].concat(), false)?)
            }
            _ => return Err(Skip::new("mixed_formats", "prompt and completion are not both strings or both message lists")),
        };
        let split = common_prefix_len(&prompt_ids, &pc);
        let (prompt_ids, completion_ids) = (prompt_ids[..split].to_vec(), pc[split..].to_vec());
        if prompt_ids.is_empty() {
            return Err(Skip::new("empty_prompt", "the prompt has no tokens, so the first completion token has no context to be scored from"));
        }
        if completion_ids.is_empty() {
            return Err(Skip::new("empty_completion", "the completion has no tokens after the prompt"));
        }
        let room = self.room(&prompt_ids)?;
        Ok(EncodedPair {
            chosen_scored: completion_ids.len().min(room) as u32,
            rejected_scored: 0,
            prompt_ids,
            chosen_ids: completion_ids,
            rejected_ids: Vec::new(),
        })
    }

    /// The completion tokens `max_length` leaves after the prompt (none: the row is dropped,
    /// as TRL drops it).
    fn room(&self, prompt_ids: &[u32]) -> Result<usize, Skip> {
        let max = self.truncation.max_length;
        if prompt_ids.len() >= max {
            return Err(Skip::new(
                "prompt_too_long",
                format!("prompt has {} tokens, max_length is {max}: no completion token would be scored", prompt_ids.len()),
            ));
        }
        Ok(max - prompt_ids.len())
    }

    fn text_joint(&self, p: &str, c: &str, r: &str) -> (Vec<u32>, Vec<u32>) {
        let eos = self.tok.eos_token.as_deref().unwrap_or("");
        let with_eos = |s: &str| if s.ends_with(eos) { s.to_string() } else { format!("{s}{eos}") };
        (self.tok.encode(&format!("{p}{}", with_eos(c)), true), self.tok.encode(&format!("{p}{}", with_eos(r)), true))
    }

    fn chat_joint(&self, row: &RawRow, p: &[Message], c: &[Message], r: &[Message]) -> Result<Triple<u32>, Skip> {
        let enc = |msgs: &[Message], gen: bool| self.tok.encode_chat(msgs, gen, row.tools.as_ref(), row.template_kwargs.as_ref());
        let join = |a: &[Message], b: &[Message]| [a, b].concat();
        Ok((enc(p, true)?, enc(&join(p, c), false)?, enc(&join(p, r), false)?))
    }
}
