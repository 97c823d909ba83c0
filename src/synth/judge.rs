//! A rule-based judge for the synthetic task (`pipeline synth-judge`, used with `label
//! --judge-cmd`): it knows the right answer of every question `synth-prefs` writes. A
//! completion that states the right fact and no other candidate scores 1; otherwise it gets
//! partial credit below 1 for the words of the model answer ("The sky is blue.") it contains,
//! so even a weak policy's samples can be told apart.
use super::prefs::{COLORS, SOUNDS};
use anyhow::{Context, Result};
use std::io::{BufRead, Write};

/// The right answer word, the other candidates of its kind, and the model answer sentence.
fn answer(question: &str) -> Option<(String, Vec<String>, String)> {
    if let Some(rest) = after(question, "What color is the ") {
        let thing = rest.split('?').next()?;
        let (_, color) = COLORS.iter().find(|(t, _)| *t == thing)?;
        let others = COLORS.iter().map(|(_, c)| c.to_string()).filter(|c| c != color).collect();
        return Some((color.to_string(), others, format!("The {thing} is {color}.")));
    }
    if let Some(rest) = after(question, "What sound does a ") {
        let animal = rest.split(" make?").next()?;
        let (_, sound) = SOUNDS.iter().find(|(a, _)| *a == animal)?;
        let others = SOUNDS.iter().map(|(_, s)| s.to_string()).filter(|s| s != sound).collect();
        return Some((sound.to_string(), others, format!("A {animal} says {sound}.")));
    }
    let rest = after(question, "What is ")?;
    let (a, rest) = rest.split_once(" plus ")?;
    let b = rest.split('?').next()?;
    let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let sum = a + b;
    let others = (0..=30).filter(|&n| n != sum && n != a && n != b).map(|n| n.to_string()).collect();
    Some((sum.to_string(), others, format!("{a} plus {b} is {sum}.")))
}

fn after<'a>(s: &'a str, marker: &str) -> Option<&'a str> {
    s.rfind(marker).map(|i| &s[i + marker.len()..])
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| w.to_lowercase()).collect()
}

/// The score of `completion` as an answer to the question in `prompt` (None: not a synthetic question).
pub fn score(prompt: &str, completion: &str) -> Option<f64> {
    let (right, others, model_answer) = answer(prompt)?;
    let said = words(completion);
    let has = |w: &str| said.iter().any(|x| x == w);
    if has(&right) && !others.iter().any(|o| has(o)) {
        return Some(1.0);
    }
    let reference = words(&model_answer);
    let overlap = reference.iter().filter(|w| **w != right && has(w)).count();
    Some(0.9 * overlap as f64 / reference.len().max(1) as f64)
}

/// The text of a prompt or completion field as the judge reads it (message contents joined).
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(msgs) => msgs.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

/// stdin JSON lines {prompt, completion} -> stdout one score per line.
pub fn run_stdio() -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("input line {}: not JSON", i + 1))?;
        let (p, c) = (text(&v["prompt"]), text(&v["completion"]));
        let s = score(&p, &c).with_context(|| format!("input line {}: not a question of the synthetic task: {p:?}", i + 1))?;
        writeln!(out, "{s}")?;
    }
    Ok(())
}
