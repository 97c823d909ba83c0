//! Synthetic preference data with a learnable signal: the chosen answer is correct and in a
//! consistent formal style; the rejected one is wrong and casual. A small model learns to
//! prefer the first within a few hundred DPO steps.
use crate::data::input::Message;
use crate::rng::Rng;
use crate::store::parquet_props;
use crate::store::PartialFile;
use anyhow::Result;
use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;

const COLORS: &[(&str, &str)] = &[
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
const SOUNDS: &[(&str, &str)] = &[
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

fn messages_type() -> DataType {
    let fields = Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)]);
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

fn messages_builder() -> ListBuilder<StructBuilder> {
    let fields = vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)];
    ListBuilder::new(StructBuilder::from_fields(fields, 0))
}

fn append_messages(b: &mut ListBuilder<StructBuilder>, msgs: &[Message]) {
    let s = b.values();
    for m in msgs {
        s.field_builder::<StringBuilder>(0).unwrap().append_value(&m.role);
        s.field_builder::<StringBuilder>(1).unwrap().append_value(&m.content);
        s.append(true);
    }
    b.append(true);
}

fn conversation(row: &SynthRow) -> (Vec<Message>, Vec<Message>, Vec<Message>) {
    let msg = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    let mut prompt = Vec::new();
    if row.system {
        prompt.push(msg("system", "You are a helpful assistant."));
    }
    prompt.push(msg("user", &row.question));
    (prompt, vec![msg("assistant", &row.chosen)], vec![msg("assistant", &row.rejected)])
}

/// Writes `rows` synthetic pairs to a parquet file (atomically).
pub fn write_synth(path: &Path, rows: usize, seed: u64, format: SynthFormat) -> Result<()> {
    let mut rng = Rng::new(seed);
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
                let (p, c, r) = conversation(&synth_row(&mut rng));
                append_messages(&mut b[0], &p);
                append_messages(&mut b[1], &c);
                append_messages(&mut b[2], &r);
            }
            b.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef).collect()
        } else {
            let mut b: [StringBuilder; 3] = std::array::from_fn(|_| StringBuilder::new());
            for _ in 0..n {
                let row = synth_row(&mut rng);
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
