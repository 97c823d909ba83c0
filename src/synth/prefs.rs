//! Synthetic preference data with a learnable signal: the chosen answer is correct and in a
//! consistent formal style; the rejected one is wrong and casual. A small model learns to
//! prefer the first within a few hundred DPO steps.
use crate::data::input::{append_messages, messages_builder, messages_type, Message};
use crate::rng::Rng;
use crate::store::parquet_props;
use crate::store::PartialFile;
use anyhow::Result;
use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;

pub const COLORS: &[(&str, &str)] = &[
    ("sky", "blue"),
    ("grass", "green"),
    ("banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("tomato", "red"),
    ("carrot", "orange"),
    ("plum", "purple"),
    ("lemon", "yellow"),
    ("cherry", "red"),
    ("ocean", "blue"),
    ("leaf", "green"),
    ("milk", "white"),
    ("night", "black"),
    ("pumpkin", "orange"),
    ("violet", "purple"),
    ("strawberry", "red"),
    ("cucumber", "green"),
    ("chalk", "white"),
    ("crow", "black"),
];
pub const SOUNDS: &[(&str, &str)] = &[
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("snake", "hiss"),
    ("bee", "buzz"),
    ("horse", "neigh"),
];
const CASUAL: &[&str] = &["idk, maybe", "lol it's", "uh... probably", "no clue, i'd say", "whatever, just"];

/// One generated example: prompt text and both answers.
pub struct SynthRow {
    pub question: String,
    pub chosen: String,
    pub rejected: String,
    pub system: bool,
}

pub fn synth_row(rng: &mut Rng) -> SynthRow {
    let (question, right, wrong) = match rng.below(3) {
        0 => {
            let (thing, color) = rng.pick(COLORS);
            let wrong = loop {
                let (_, c) = rng.pick(COLORS);
                if c != color {
                    break *c;
                }
            };
            (format!("What color is the {thing}?"), format!("The {thing} is {color}."), format!("{} {wrong}", rng.pick(CASUAL)))
        }
        1 => {
            let (animal, sound) = rng.pick(SOUNDS);
            let wrong = loop {
                let (_, s) = rng.pick(SOUNDS);
                if s != sound {
                    break *s;
                }
            };
            (format!("What sound does a {animal} make?"), format!("A {animal} says {sound}."), format!("{} {wrong}", rng.pick(CASUAL)))
        }
        _ => {
            let (a, b) = (rng.below(10), rng.below(10));
            let off = 1 + rng.below(3);
            (format!("What is {a} plus {b}?"), format!("{a} plus {b} is {}.", a + b), format!("{} {}", rng.pick(CASUAL), a + b + off))
        }
    };
    SynthRow { question, chosen: right, rejected: wrong, system: rng.below(2) == 0 }
}

/// Background sentences for `--long` rows: they stretch prompts and answers to the length
/// spread of published preference sets without touching which answer is right.
const FILLER: &[&str] = &[
    "Some background may help here, so please read the whole note before answering.",
    "This question comes from a set that checks simple facts about the world.",
    "Answer in one short sentence and keep the wording plain and direct.",
    "People often get this wrong when they answer too quickly without thinking.",
    "The answer should be the one most readers would agree with at once.",
    "There is no trick in the question, and the usual meaning of each word applies.",
    "Think about what you have seen or heard in everyday life before you decide.",
    "A good answer names the fact and does not add anything that is not asked for.",
];

/// Appends 0..=max filler sentences to `text`.
fn stretch(text: &str, rng: &mut Rng, max: usize) -> String {
    let mut s = text.to_string();
    for _ in 0..rng.below(max + 1) {
        s.push(' ');
        let sentence: &&str = rng.pick(FILLER);
        s.push_str(sentence);
    }
    s
}

/// `row` with a context before the question and explanations after both answers, each of
/// 0–4 sentences drawn independently: with the generated tokenizers, prompts of ~15–200
/// tokens and answers of ~5–200, a spread like UltraFeedback's (for benchmarks of packing).
pub fn lengthen(row: SynthRow, rng: &mut Rng) -> SynthRow {
    let context = stretch("", rng, 4);
    SynthRow {
        question: format!("{}{}{}", context.trim_start(), if context.is_empty() { "" } else { " " }, row.question),
        chosen: stretch(&row.chosen, rng, 4),
        rejected: stretch(&row.rejected, rng, 4),
        system: row.system,
    }
}

/// How long generated rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// One sentence each: the demo and tests.
    Short,
    /// UltraFeedback-like spread (`lengthen`).
    Long,
    /// Prompt + chosen + rejected of about this many tokens with the generated tokenizers
    /// (±20%: 40% prompt, 30% each answer), for long-pair benchmarks.
    Tokens(usize),
}

/// A filler sentence is about this many tokens with the generated tokenizers (measured: the
/// 512- and 8,000-token vocabularies never saw these sentences, so words split into pieces).
const TOKENS_PER_SENTENCE: f64 = 43.0;

/// `row` stretched to a pair of about `tokens` tokens.
fn to_tokens(row: SynthRow, rng: &mut Rng, tokens: usize) -> SynthRow {
    let part = |text: &str, share: f64, rng: &mut Rng| {
        let jitter = 0.8 + 0.4 * rng.uniform();
        let n = (tokens as f64 * share * jitter / TOKENS_PER_SENTENCE).round() as usize;
        let mut s = text.to_string();
        for _ in 0..n {
            s.push(' ');
            s.push_str(rng.pick::<&str>(FILLER));
        }
        s
    };
    let context = part("", 0.4, rng);
    SynthRow {
        question: format!("{} {}", context.trim_start(), row.question).trim_start().to_string(),
        chosen: part(&row.chosen, 0.3, rng),
        rejected: part(&row.rejected, 0.3, rng),
        system: row.system,
    }
}

/// Plain-text rendering used by the standard format (and to train the demo tokenizer).
pub fn text_prompt(row: &SynthRow) -> String {
    format!("Question: {}\nAnswer:", row.question)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    Standard,
    Conversational,
    /// No prompt column: chosen and rejected carry the prompt (TRL's implicit prompt).
    Implicit,
}

fn conversation(row: &SynthRow) -> (Vec<Message>, Vec<Message>, Vec<Message>) {
    let msg = |role: &str, content: &str| Message::new(role, content);
    let mut prompt = Vec::new();
    if row.system {
        prompt.push(msg("system", "You are a helpful assistant."));
    }
    prompt.push(msg("user", &row.question));
    (prompt, vec![msg("assistant", &row.chosen)], vec![msg("assistant", &row.rejected)])
}

/// Writes `rows` synthetic pairs to a parquet file (atomically), as long as `length` says.
pub fn write_synth(path: &Path, rows: usize, seed: u64, format: SynthFormat, length: Length) -> Result<()> {
    let mut rng = Rng::new(seed);
    let next = |rng: &mut Rng| {
        let row = synth_row(rng);
        match length {
            Length::Short => row,
            Length::Long => lengthen(row, rng),
            Length::Tokens(n) => to_tokens(row, rng, n),
        }
    };
    let (schema, conv) = match format {
        SynthFormat::Standard => (vec![("prompt", DataType::Utf8), ("chosen", DataType::Utf8), ("rejected", DataType::Utf8)], false),
        SynthFormat::Conversational => (vec![("prompt", messages_type()), ("chosen", messages_type()), ("rejected", messages_type())], true),
        SynthFormat::Implicit => (vec![("chosen", DataType::Utf8), ("rejected", DataType::Utf8)], false),
    };
    let schema = Arc::new(Schema::new(schema.into_iter().map(|(n, t)| Field::new(n, t, false)).collect::<Vec<_>>()));
    let file = PartialFile::create(path)?;
    let mut writer = ArrowWriter::try_new(file.try_clone_file()?, schema.clone(), Some(parquet_props()))?;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(8192);
        let arrays: Vec<ArrayRef> = if conv {
            let mut b: [ListBuilder<StructBuilder>; 3] = std::array::from_fn(|_| messages_builder());
            for _ in 0..n {
                let (p, c, r) = conversation(&next(&mut rng));
                append_messages(&mut b[0], &p);
                append_messages(&mut b[1], &c);
                append_messages(&mut b[2], &r);
            }
            b.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect()
        } else {
            let mut b: [StringBuilder; 3] = std::array::from_fn(|_| StringBuilder::new());
            for _ in 0..n {
                let row = next(&mut rng);
                let p = text_prompt(&row);
                b[0].append_value(&p);
                if format == SynthFormat::Implicit {
                    b[1].append_value(format!("{p} {}", row.chosen));
                    b[2].append_value(format!("{p} {}", row.rejected));
                } else {
                    b[1].append_value(format!(" {}", row.chosen));
                    b[2].append_value(format!(" {}", row.rejected));
                }
            }
            let start = if format == SynthFormat::Implicit { 1 } else { 0 };
            b[start..].iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect()
        };
        writer.write(&RecordBatch::try_new(schema.clone(), arrays)?)?;
        done += n;
    }
    writer.close()?;
    file.commit()
}

/// `prefs.parquet` -> `prefs.eval.parquet`.
pub fn eval_path(path: &Path) -> std::path::PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let ext = path.extension().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "parquet".into());
    path.with_file_name(format!("{stem}.eval.{ext}"))
}
