//! bitsandbytes 4-bit weights (NF4 / FP4), the one owner of that format: reading what
//! transformers saves for `BitsAndBytesConfig(load_in_4bit=True)` (packed `weight` bytes,
//! `weight.absmax`, `weight.quant_map`, the `weight.quant_state.bitsandbytes__*` JSON, and with
//! double quantization `weight.nested_absmax` / `weight.nested_quant_map`), quantizing on load
//! to the same bytes as bitsandbytes 0.50 on the CPU, dequantizing as it does (code × absmax in
//! f32), and the frozen linear layer over such a weight: `y = x Wᵀ` with the backward giving x
//! its gradient, W none. On the CPU the weight is dequantized a slab of rows at a time into a
//! small buffer that one GEMM consumes, so no full-precision copy of a layer is ever kept; on
//! other devices (CUDA) it is dequantized with candle ops for each call, as bitsandbytes does.
use super::fused::{applies, contiguous, Real};
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The 4-bit data type (bitsandbytes' `quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// bitsandbytes' code book (`get_4bit_type`), indexed by the stored nibble.
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4,
            QuantType::Fp4 => FP4,
        }
    }
}

const NF4: [f32; 16] = [
    -1.0, -0.696_192_8, -0.525_073_05, -0.394_917_5, -0.284_441_38, -0.184_773_43, -0.091_050_036, 0.0, 0.079_580_3, 0.160_930_2, 0.246_112_3,
    0.337_915_24, 0.440_709_83, 0.562_617, 0.722_956_84, 1.0,
];
const FP4: [f32; 16] = [
    0.0, 0.005_208_333_5, 0.666_666_7, 1.0, 0.333_333_34, 0.5, 0.166_666_67, 0.25, 0.0, -0.005_208_333_5, -0.666_666_7, -1.0, -0.333_333_34, -0.5,
    -0.166_666_67, -0.25,
];

/// The nibbles in ascending order of their code values (bitsandbytes' `argsort` of the code
/// book, whose tie between FP4's two zeros it breaks this way).
fn sorted_order(t: QuantType) -> [u8; 16] {
    match t {
        QuantType::Nf4 => [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        QuantType::Fp4 => [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3],
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)` as float32 bits: the 8-bit code of double
/// quantization's absmax.
const DYNAMIC: [u32; 256] = include!("dynamic_map.in");

/// What a run quantizes (or what a checkpoint was quantized with): transformers'
/// `BitsAndBytesConfig` fields for 4 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSpec {
    pub quant_type: QuantType,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: the dtype the dequantized weight is multiplied in.
    pub compute_dtype: DType,
    pub blocksize: usize,
    /// Modules kept in full precision (`llm_int8_skip_modules`); the output head always is.
    pub skip: Vec<String>,
}

impl QuantSpec {
    pub fn new(quant_type: QuantType, double_quant: bool, compute_dtype: DType) -> Self {
        Self { quant_type, double_quant, compute_dtype, blocksize: 64, skip: Vec::new() }
    }

    /// The `quantization_config` of a config.json: None without one, an error for anything but
    /// bitsandbytes 4-bit (naming the method), the spec otherwise.
    pub fn from_config(raw: &serde_json::Value, path: &Path) -> Result<Option<Self>> {
        let Some(q) = raw.get("quantization_config") else { return Ok(None) };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
        let four = q.get("load_in_4bit").and_then(|v| v.as_bool()).unwrap_or(false);
        if method != "bitsandbytes" || !four {
            let what = if method == "bitsandbytes" { "bitsandbytes 8-bit (load_in_8bit)".to_string() } else { format!("`{method}`") };
            bail!(
                "{}: quantization_config is {what}; this tool reads bitsandbytes 4-bit checkpoints (load_in_4bit, nf4/fp4) and full-precision ones \
                 (load the original weights, with --load-in-4bit to quantize them here)",
                path.display()
            );
        }
        let quant_type = match q.get("bnb_4bit_quant_type").and_then(|v| v.as_str()).unwrap_or("fp4") {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            other => bail!("{}: quantization_config.bnb_4bit_quant_type `{other}` (expected nf4 or fp4)", path.display()),
        };
        let compute_dtype = match q.get("bnb_4bit_compute_dtype").and_then(|v| v.as_str()).unwrap_or("float32") {
            "float32" | "fp32" | "f32" => DType::F32,
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "fp16" | "f16" => DType::F16,
            other => bail!("{}: quantization_config.bnb_4bit_compute_dtype `{other}`", path.display()),
        };
        let skip = q
            .get("llm_int8_skip_modules")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let double_quant = q.get("bnb_4bit_use_double_quant").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Some(Self { quant_type, double_quant, compute_dtype, blocksize: 64, skip }))
    }

    /// Whether transformers quantizes this tensor: the weight of a linear layer inside the
    /// decoder layers (not the embedding, norms, output head, router or what `skip` names).
    pub fn quantizes(&self, name: &str) -> bool {
        let Some(module) = name.strip_suffix(".weight") else { return false };
        let leaf = module.rsplit('.').next().unwrap_or("");
        module.contains(".layers.")
            && (leaf.ends_with("_proj") || matches!(leaf, "w1" | "w2" | "w3"))
            && !self.skip.iter().any(|s| module.split('.').any(|p| p == s))
    }
}

/// Reads what `Quant4::to_bytes` wrote.
struct ByteReader<'a> {
    b: &'a [u8],
    at: usize,
}

impl ByteReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let v = self.b.get(self.at..self.at + n).context("4-bit weight bytes: cut short")?;
        self.at += n;
        Ok(v)
    }

    fn int(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")) as usize)
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.int()?;
        Ok(self.take(n)?.to_vec())
    }

    fn floats(&mut self) -> Result<Vec<f32>> {
        let n = self.int()?;
        Ok(self.take(4 * n)?.chunks(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
}

/// Double quantization's second level: the per-block absmax stored as 8-bit codes of
/// `absmax − offset`, blocks of `blocksize` sharing one f32 scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Nested {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
    pub code: Vec<f32>,
    pub offset: f32,
    pub blocksize: usize,
}

/// One 4-bit weight [rows, cols] (row-major, blocks over the flattened tensor as bitsandbytes
/// makes them).
#[derive(Debug, Clone)]
pub struct Quant4 {
    pub rows: usize,
    pub cols: usize,
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Two nibbles a byte, the even element in the high nibble.
    pub packed: Vec<u8>,
    /// The code book the file carries (`quant_map`).
    pub code: [f32; 16],
    /// Each block's scale; empty with double quantization, whose codes are undone block by
    /// block where they are used (an f32 copy would be 0.5 bit a weight, 0.44 GB at 8B).
    pub absmax: Vec<f32>,
    pub nested: Option<Nested>,
    /// For other devices: packed bytes, scales and code book there (see `dequantize_on`).
    device: Option<(Tensor, Tensor, Tensor)>,
}

impl Quant4 {
    /// Quantizes `w` ([rows, cols], f32) as bitsandbytes' `quantize_4bit` does on the CPU.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Self {
        let bs = spec.blocksize;
        let order = sorted_order(spec.quant_type);
        let code = spec.quant_type.code();
        let bounds: Vec<f32> = (0..15).map(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0).collect();
        let n = w.len();
        let absmax: Vec<f32> = w.chunks(bs).map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs()))).collect();
        let full = n - n % bs;
        let mut nib = vec![0u8; n + n % 2];
        nib[..n].par_chunks_mut(bs).zip(w.par_chunks(bs)).zip(absmax.par_iter()).enumerate().for_each(|(bi, ((out, x), &am))| {
            let am = am.max(1e-38);
            let inv = 1.0 / am;
            for (o, &v) in out.iter_mut().zip(x) {
                // The last, short block divides; full ones multiply by the reciprocal (as bnb).
                let s = if bi * bs >= full { v / am } else { v * inv }.clamp(-1.0, 1.0);
                *o = order[bounds.iter().take_while(|&&b| b < s).count()];
            }
        });
        let packed = nib.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let nested = spec.double_quant.then(|| Nested::quantize(&absmax));
        let absmax = if nested.is_some() { Vec::new() } else { absmax };
        Self { rows, cols, quant_type: spec.quant_type, blocksize: bs, packed, code, absmax, nested, device: None }
    }

    /// Reads weight `name` as transformers saved it (see the module's comment); None when the
    /// files hold it unquantized (no `quant_state` entry).
    pub fn load(st: &candle_core::safetensors::MmapedSafetensors, name: &str, file: &Path) -> Result<Option<Self>> {
        let err = |what: &str| format!("{}: 4-bit weight `{name}`: {what}", file.display());
        let get =
            |suffix: &str| st.load(&format!("{name}{suffix}"), &Device::Cpu).with_context(|| err(&format!("tensor `{name}{suffix}` is missing")));
        let state_name = ["nf4", "fp4"].iter().map(|t| format!(".quant_state.bitsandbytes__{t}")).find(|s| st.get(&format!("{name}{s}")).is_ok());
        let Some(state_name) = state_name else { return Ok(None) };
        let state: serde_json::Value =
            serde_json::from_slice(&get(&state_name)?.flatten_all()?.to_vec1::<u8>()?).with_context(|| err("quant_state is not JSON"))?;
        let quant_type = match state["quant_type"].as_str() {
            Some("nf4") => QuantType::Nf4,
            Some("fp4") => QuantType::Fp4,
            other => bail!(err(&format!("quant_type {other:?}"))),
        };
        let shape: Vec<usize> =
            state["shape"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect()).unwrap_or_default();
        let [rows, cols] = shape[..] else { bail!(err(&format!("shape {:?} is not 2-D", state["shape"]))) };
        let blocksize = state["blocksize"].as_u64().with_context(|| err("no blocksize"))? as usize;
        let packed = get("")?;
        if packed.dtype() != DType::U8 {
            bail!(err(&format!("packed weight is {:?}; only uint8 quant_storage is read", packed.dtype())));
        }
        let packed = packed.flatten_all()?.to_vec1::<u8>()?;
        if packed.len() != (rows * cols).div_ceil(2) {
            bail!(err(&format!("{} packed bytes for shape [{rows}, {cols}]", packed.len())));
        }
        let code: Vec<f32> = get(".quant_map")?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let code: [f32; 16] = code.try_into().map_err(|_| anyhow::anyhow!(err("quant_map has not 16 entries")))?;
        let absmax_t = get(".absmax")?;
        let blocks = (rows * cols).div_ceil(blocksize);
        let nested = if st.get(&format!("{name}.nested_absmax")).is_ok() {
            let offset = state["nested_offset"].as_f64().with_context(|| err("no nested_offset"))? as f32;
            let nested = Nested {
                codes: absmax_t.flatten_all()?.to_vec1::<u8>()?,
                absmax: get(".nested_absmax")?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                code: get(".nested_quant_map")?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                offset,
                blocksize: state["nested_blocksize"].as_u64().unwrap_or(256) as usize,
            };
            Some(nested)
        } else {
            None
        };
        let absmax = match &nested {
            Some(n) if n.codes.len() == blocks && n.absmax.len() == blocks.div_ceil(n.blocksize) && n.code.len() == 256 => Vec::new(),
            Some(n) => bail!(err(&format!("{} nested absmax codes for {blocks} blocks", n.codes.len()))),
            None => absmax_t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        };
        if nested.is_none() && absmax.len() != blocks {
            bail!(err(&format!("{} absmax entries for {blocks} blocks", absmax.len())));
        }
        Ok(Some(Self { rows, cols, quant_type, blocksize, packed, code, absmax, nested, device: None }))
    }

    /// Block b's scale: its absmax, or with double quantization its 8-bit code undone
    /// (code × scale + offset in f32, as bitsandbytes).
    #[inline]
    fn scale(&self, b: usize) -> f32 {
        match &self.nested {
            Some(n) => n.code[n.codes[b] as usize] * n.absmax[b / n.blocksize] + n.offset,
            None => self.absmax[b],
        }
    }

    /// Every block's scale, as the dequantization uses it.
    pub fn scales(&self) -> Vec<f32> {
        (0..(self.rows * self.cols).div_ceil(self.blocksize)).map(|b| self.scale(b)).collect()
    }

    /// Rows `r0..r0 + out.len() / cols`, dequantized into `out` as bitsandbytes does: element
    /// i is code[nibble i] × scale[i / blocksize], in f32.
    fn dequantize_rows<T: Real>(&self, r0: usize, out: &mut [T]) {
        let (base, bs) = (r0 * self.cols, self.blocksize);
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(r, row)| {
            let s = base + r * self.cols;
            let mut j = 0;
            while j < row.len() {
                // One block (or the part of it in this row) under one scale.
                let b = (s + j) / bs;
                let end = ((b + 1) * bs - s).min(row.len());
                let scale = self.scale(b);
                for (jj, o) in row[j..end].iter_mut().enumerate() {
                    let i = s + j + jj;
                    let byte = self.packed[i / 2];
                    let nib = if i.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
                    *o = T::from((self.code[nib as usize] * scale) as f64);
                }
                j = end;
            }
        });
    }

    /// The whole weight in f32 (merging, tests): bitsandbytes' `dequantize_4bit`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.dequantize(), (self.rows, self.cols), device)?.to_dtype(dtype)?)
    }

    /// Bytes this weight holds in memory (packed nibbles, scales, nested codes).
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len() + self.nested.as_ref().map(|n| n.codes.len() + 4 * n.absmax.len()).unwrap_or(0)
    }

    /// The weight as bytes, for another rank (fully sharded training hands each 4-bit weight
    /// from the rank that holds it to the others); `from_bytes` reads them back.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.bytes() + 128);
        let int = |b: &mut Vec<u8>, x: usize| b.extend((x as u64).to_le_bytes());
        let bytes = |b: &mut Vec<u8>, v: &[u8]| {
            int(b, v.len());
            b.extend_from_slice(v);
        };
        let floats = |b: &mut Vec<u8>, v: &[f32]| {
            int(b, v.len());
            v.iter().for_each(|x| b.extend(x.to_le_bytes()));
        };
        int(&mut b, self.rows);
        int(&mut b, self.cols);
        int(&mut b, (self.quant_type == QuantType::Fp4) as usize);
        int(&mut b, self.blocksize);
        bytes(&mut b, &self.packed);
        floats(&mut b, &self.code);
        floats(&mut b, &self.absmax);
        match &self.nested {
            None => int(&mut b, 0),
            Some(n) => {
                int(&mut b, 1);
                bytes(&mut b, &n.codes);
                floats(&mut b, &n.absmax);
                floats(&mut b, &n.code);
                floats(&mut b, &[n.offset]);
                int(&mut b, n.blocksize);
            }
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = ByteReader { b, at: 0 };
        let (rows, cols, fp4, blocksize) = (r.int()?, r.int()?, r.int()?, r.int()?);
        let packed = r.bytes()?;
        let code: [f32; 16] = r.floats()?.try_into().map_err(|_| anyhow::anyhow!("4-bit weight bytes: a code book of 16"))?;
        let absmax = r.floats()?;
        let nested = match r.int()? {
            0 => None,
            _ => Some(Nested {
                codes: r.bytes()?,
                absmax: r.floats()?,
                code: r.floats()?,
                offset: r.floats()?.first().copied().context("4-bit weight bytes: no offset")?,
                blocksize: r.int()?,
            }),
        };
        let quant_type = if fp4 == 1 { QuantType::Fp4 } else { QuantType::Nf4 };
        Ok(Quant4 { rows, cols, quant_type, blocksize, packed, code, absmax, nested, device: None })
    }

    /// Copies what the device path needs to `device` (no-op on the CPU).
    pub fn place(&mut self, device: &Device) -> Result<()> {
        if !device.is_cpu() {
            self.device = Some((
                Tensor::from_slice(&self.packed, self.packed.len(), device)?,
                Tensor::from_vec(self.scales(), (self.rows * self.cols).div_ceil(self.blocksize), device)?,
                Tensor::from_slice(&self.code, 16, device)?,
            ));
        }
        Ok(())
    }

    /// The weight dequantized with candle ops where its tensors live (devices other than the
    /// CPU): nibbles from the bytes, looked up in the code book, scaled per block.
    fn dequantize_on(&self, dtype: DType) -> Result<Tensor> {
        let Some((packed, absmax, code)) = &self.device else { return self.to_tensor(dtype, &Device::Cpu) };
        let bytes = packed.to_dtype(DType::F32)?;
        let hi = (&bytes / 16.0)?.floor()?;
        let lo = (&bytes - (&hi * 16.0)?)?;
        let nibbles = Tensor::stack(&[hi, lo], 1)?.flatten_all()?.to_dtype(DType::U32)?;
        let n = self.rows * self.cols;
        let vals = code.index_select(&nibbles, 0)?.narrow(0, 0, n)?;
        let blocks = n / self.blocksize;
        let w = if blocks * self.blocksize == n {
            vals.reshape((blocks, self.blocksize))?.broadcast_mul(&absmax.reshape((blocks, 1))?)?
        } else {
            let idx: Vec<u32> = (0..n).map(|i| (i / self.blocksize) as u32).collect();
            (vals * absmax.index_select(&Tensor::from_vec(idx, n, absmax.device())?, 0)?)?
        };
        Ok(w.reshape((self.rows, self.cols))?.to_dtype(dtype)?)
    }
}

impl Nested {
    /// bitsandbytes' `quantize_blockwise(absmax − mean, blocksize=256)` on the CPU (its 8-bit
    /// look-up table: 65,536 bins over [−1, 1], each the code nearest its centre).
    fn quantize(absmax: &[f32]) -> Self {
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let code: Vec<f32> = DYNAMIC.iter().map(|&b| f32::from_bits(b)).collect();
        let mid: Vec<f32> = (0..255).map(|i| 0.5 * (code[i] + code[i + 1])).collect();
        const BINS: usize = 65536;
        let mut lut = vec![0u8; BINS];
        let mut c = 0;
        for (i, l) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0 * i as f32) / (BINS - 1) as f32;
            while c < 255 && mid[c] < v {
                c += 1;
            }
            *l = c as u8;
        }
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let bs = 256;
        let scales: Vec<f32> = centred.chunks(bs).map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs()))).collect();
        let mut codes = Vec::with_capacity(centred.len());
        for (b, &s) in centred.chunks(bs).zip(&scales) {
            let inv = 1.0 / s;
            codes.extend(b.iter().map(|&x| {
                if s == 0.0 {
                    0
                } else {
                    lut[(((x * inv).clamp(-1.0, 1.0) + 1.0) * 0.5 * (BINS - 1) as f32 + 0.5) as u16 as usize]
                }
            }));
        }
        Self { codes, absmax: scales, code, offset, blocksize: bs }
    }
}

/// The 4-bit weights of a model, by tensor name (`…q_proj.weight`).
pub type QuantWeights = HashMap<String, Arc<Quant4>>;

/// Output rows of W dequantized per slab: ~1 MiB of f32, so a slab stays in cache while its
/// GEMM reads it.
fn slab_rows(cols: usize) -> usize {
    (262_144 / cols.max(1)).clamp(16, 4096)
}

/// y [n, rows] = x [n, cols] · Wᵀ for a frozen 4-bit W (see the module's comment).
pub struct Quant4Linear(pub Arc<Quant4>);

impl Quant4Linear {
    /// Calls `f(r0, r, slab)` for each slab of W's rows r0..r0+r, dequantized (r×cols) into one
    /// reused buffer.
    fn each_slab<T: Real>(&self, mut f: impl FnMut(usize, usize, &[T])) {
        let (o, k) = (self.0.rows, self.0.cols);
        let step = slab_rows(k);
        let mut w = vec![T::from(0.0); step.min(o) * k];
        for r0 in (0..o).step_by(step) {
            let r = step.min(o - r0);
            self.0.dequantize_rows(r0, &mut w[..r * k]);
            f(r0, r, &w[..r * k]);
        }
    }

    fn fwd<T: Real>(&self, x: &[T], n: usize) -> Vec<T> {
        let (o, k) = (self.0.rows, self.0.cols);
        let mut y = vec![T::from(0.0); n * o];
        self.each_slab(|r0, r, w: &[T]| {
            // SAFETY: x is n×k, the slab r×k, y's columns r0..r0+r of an n×o row-major matrix.
            unsafe {
                gemm::gemm(
                    n,
                    r,
                    k,
                    y.as_mut_ptr().add(r0),
                    1,
                    o as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    T::from(0.0),
                    T::from(1.0),
                    false,
                    false,
                    false,
                    super::fused::par(),
                );
            }
        });
        y
    }

    /// dx [n, cols] = g [n, rows] · W, one slab of W's rows at a time.
    fn bwd_input<T: Real>(&self, g: &[T], n: usize) -> Vec<T> {
        let (o, k) = (self.0.rows, self.0.cols);
        let mut dx = vec![T::from(0.0); n * k];
        self.each_slab(|r0, r, w: &[T]| {
            // SAFETY: g's columns r0..r0+r (row stride o), the slab r×k, dx n×k.
            unsafe {
                gemm::gemm(
                    n,
                    k,
                    r,
                    dx.as_mut_ptr(),
                    1,
                    k as isize,
                    r0 > 0,
                    g.as_ptr().add(r0),
                    1,
                    o as isize,
                    w.as_ptr(),
                    1,
                    k as isize,
                    T::from(1.0),
                    T::from(1.0),
                    false,
                    false,
                    false,
                    super::fused::par(),
                );
            }
        });
        dx
    }
}

impl CustomOp1 for Quant4Linear {
    fn name(&self) -> &'static str {
        "quant4-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = l.shape().dims2()?;
        if k != self.0.cols {
            return Err(candle_core::Error::Msg(format!("4-bit linear: input {n}x{k}, weight {}x{}", self.0.rows, self.0.cols)));
        }
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.fwd(contiguous::<f32>(s, l)?, n)),
            DType::F64 => CpuStorage::F64(self.fwd(contiguous::<f64>(s, l)?, n)),
            dt => return Err(candle_core::Error::Msg(format!("4-bit linear: unsupported dtype {dt:?}"))),
        };
        Ok((out, Shape::from((n, self.0.rows))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Quant4LinearInput(self.0.clone()))?))
    }
}

/// dx = g · W (the backward of [`Quant4Linear`]; itself needs none).
struct Quant4LinearInput(Arc<Quant4>);

impl CustomOp1 for Quant4LinearInput {
    fn name(&self) -> &'static str {
        "quant4-linear-input"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, o) = l.shape().dims2()?;
        let op = Quant4Linear(self.0.clone());
        if o != self.0.rows {
            return Err(candle_core::Error::Msg(format!("4-bit linear backward: grad {n}x{o}, weight {}x{}", self.0.rows, self.0.cols)));
        }
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(op.bwd_input(contiguous::<f32>(s, l)?, n)),
            DType::F64 => CpuStorage::F64(op.bwd_input(contiguous::<f64>(s, l)?, n)),
            dt => return Err(candle_core::Error::Msg(format!("4-bit linear backward: unsupported dtype {dt:?}"))),
        };
        Ok((out, Shape::from((n, self.0.cols))))
    }
}

/// x [n, cols] · Wᵀ for a frozen 4-bit W: the fused CPU kernel for f32/f64 x, else (bf16
/// compute, other devices) W dequantized in x's dtype for this call and a plain matmul.
pub fn linear(x: &Tensor, w: &Arc<Quant4>) -> Result<Tensor> {
    if applies(x) {
        return Ok(x.contiguous()?.apply_op1(Quant4Linear(w.clone()))?);
    }
    let wd = if x.device().is_cpu() { w.to_tensor(x.dtype(), x.device())? } else { w.dequantize_on(x.dtype())? };
    Ok(super::bf16_gemm::mm(x, &wd.t()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one rank sends another is the weight: every field, with and without double
    /// quantization, and a cut-short message is an error.
    #[test]
    fn a_4bit_weight_survives_its_bytes() {
        let w: Vec<f32> = (0..64 * 12).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        for double in [false, true] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                let q = Quant4::quantize(&w, 12, 64, &QuantSpec::new(qt, double, DType::F32));
                let b = Quant4::from_bytes(&q.to_bytes()).unwrap();
                assert_eq!((b.rows, b.cols, b.quant_type, b.blocksize), (q.rows, q.cols, q.quant_type, q.blocksize));
                assert_eq!((&b.packed, b.code, &b.absmax, &b.nested), (&q.packed, q.code, &q.absmax, &q.nested));
                assert_eq!(b.dequantize(), q.dequantize());
                assert!(double == q.nested.is_some());
                let bytes = q.to_bytes();
                assert!(Quant4::from_bytes(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }
}
