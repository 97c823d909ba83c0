//! `cargo bench --bench prepare`: prepare's throughput against the tokenizer alone (the
//! practical limit), and its peak memory at 20k vs 200k rows. BENCH_THREADS sets threads (2).
mod common;
use common::*;
use dpo_pipeline::data::input::{ColumnNames, Field, InputRow, PreferenceReader};
use dpo_pipeline::data::tokenize::ModelTokenizer;
use std::time::Instant;

fn main() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let threads = threads();
    run(p, &["init-model", "--arch", "qwen2", "--size", "small", "--out", "m"]);
    run(p, &["synth-prefs", "--out", "big.parquet", "--rows", "200000", "--seed", "1"]);
    run(p, &["synth-prefs", "--out", "small.parquet", "--rows", "20000", "--seed", "2"]);

    // The same strings prepare encodes (prompt, prompt+chosen+EOS, prompt+rejected+EOS), through
    // tokenizers' encode_batch alone.
    rayon::ThreadPoolBuilder::new().num_threads(threads.parse().unwrap()).build_global().unwrap();
    let tok = ModelTokenizer::load(&p.join("m"), dpo_pipeline::data::chat::Date::today()).unwrap();
    let eos = tok.eos_token.clone().unwrap();
    let mut reader = PreferenceReader::open(&p.join("big.parquet"), &ColumnNames::default(), 2048).unwrap();
    let mut texts: Vec<Vec<String>> = Vec::new();
    while let Some(batch) = reader.next_batch().unwrap() {
        let mut chunk = Vec::new();
        for (_, row) in batch {
            let InputRow::Paired(row) = row.unwrap() else { panic!("synth-prefs writes pairs") };
            let (Some(Field::Text(pr)), Field::Text(c), Field::Text(r)) = (row.prompt, row.chosen, row.rejected) else { panic!() };
            chunk.push(pr.clone());
            chunk.push(format!("{pr}{c}{eos}"));
            chunk.push(format!("{pr}{r}{eos}"));
        }
        texts.push(chunk);
    }
    let t = Instant::now();
    let mut tokens = 0usize;
    for chunk in texts {
        let enc = tok.tokenizer.encode_batch(chunk, true).unwrap();
        tokens += enc.iter().map(|e| e.len()).sum::<usize>();
    }
    let tok_s = t.elapsed().as_secs_f64();

    let (wall_big, rss_big) = run(p, &["--threads", &threads, "prepare", "--input", "big.parquet", "--model", "m", "--out", "pb"]);
    let (_, rss_small) = run(p, &["--threads", &threads, "prepare", "--input", "small.parquet", "--model", "m", "--out", "ps"]);
    let m = manifest(&p.join("pb"));
    let prep_tokens = m["counts"]["tokens"].as_f64().unwrap();
    println!("prepare benchmark (200,000 rows, small model tokenizer, {threads} threads)");
    println!(
        "  tokenizer encode_batch alone : {:>9.0} rows/s  {:>10.0} tokens/s (encoded: {tokens} tokens)",
        200_000.0 / tok_s,
        tokens as f64 / tok_s
    );
    println!(
        "  pipeline prepare (end to end): {:>9.0} rows/s  {:>10.0} tokens/s (stored: {prep_tokens} tokens)",
        200_000.0 / wall_big,
        prep_tokens / wall_big
    );
    println!("  ratio prepare / tokenizer    : {:.2} (rows/s)", (200_000.0 / wall_big) / (200_000.0 / tok_s));
    println!("  peak RSS: 20k rows {rss_small:.0} MiB, 200k rows {rss_big:.0} MiB (ratio {:.2})", rss_big / rss_small);
}
