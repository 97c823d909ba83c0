//! Full sharding (ZeRO-3 / FSDP's FULL_SHARD, `train --shard-params`): each rank holds a flat
//! 1/W shard of every decoder-layer weight, the embedding and the head (trained, or the frozen
//! base under LoRA) and of every other trained weight, with the matching gradient and AdamW
//! moments; a 4-bit base's packed weights are shared out whole, one rank holding each.
//!
//! - A layer's full weights exist only while it runs: the decoder asks this module (its
//!   [`LayerSource`]) to all-gather them before the layer's forward and again for its backward
//!   (the layer reruns there, as under gradient checkpointing), and hands the layer's weight
//!   gradients back to be reduce-scattered, so each rank keeps only its shard of them.
//! - The embedding and the output head the same way: gathered for the lookup and freed, the
//!   head gathered for the log-prob pass and again for its backward (the decoder's
//!   `EmbedLookup` and `HeadPass`). Only the final norm (and a trained one's gradient) is held
//!   whole through a step: FSDP's root unit, gathered after every optimizer step.
//! - Tensor t of n elements is cut in chunks of c = ⌈n/W⌉: rank r holds elements
//!   [r·c, min((r+1)·c, n)), zero-padded to c (the padding has zero gradient, so it stays 0).
//! - Checkpoints are the usual HF / PEFT files, gathered one tensor at a time and written by
//!   rank 0, and AdamW moments as one file per rank with an index (`optimizer.index.json`), read
//!   back at any world size.
use super::dist::{PendingGather, World};
use crate::model::decoder::{Gathered, LayerSource};
use crate::model::quant::Quant4;
use crate::model::ModelConfig;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The moments' index beside the per-rank files of a sharded checkpoint.
pub const OPTIMIZER_INDEX: &str = "optimizer.index.json";

/// Elements per rank of a tensor of `n` elements over `world` ranks.
pub fn chunk(n: usize, world: usize) -> usize {
    n.div_ceil(world.max(1)).max(1)
}

/// The elements rank `rank` holds (empty past the end: a tensor smaller than the world).
pub fn span(n: usize, world: usize, rank: usize) -> Range<usize> {
    let c = chunk(n, world);
    (rank * c).min(n)..((rank + 1) * c).min(n)
}

/// `t` in storage of its own size (candle's `copy` clones the whole storage a view points
/// into: a shard "copied" that way would keep the full tensor alive).
fn compact(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(t)?.as_tensor().detach())
}

/// `full`'s shard for `rank`: its span, zero-padded to the chunk, in its own storage.
pub fn shard_of(full: &Tensor, world: usize, rank: usize) -> Result<Tensor> {
    let n = full.elem_count();
    let s = span(n, world, rank);
    let flat = full.flatten_all()?;
    let part = flat.narrow(0, s.start, s.len())?;
    let pad = chunk(n, world) - s.len();
    Ok(if pad == 0 { compact(&part)? } else { Tensor::cat(&[&part, &Tensor::zeros(pad, full.dtype(), full.device())?], 0)? })
}

/// The file holding rank `rank`'s moments of a checkpoint written by `world` ranks.
pub fn optimizer_file(rank: usize, world: usize) -> String {
    format!("optimizer-{:05}-of-{:05}.safetensors", rank + 1, world)
}

/// This rank's shards of the weights, the layers they belong to, and the step's gradients.
pub struct Sharded {
    world: World,
    /// Every sharded tensor's shape (HF / PEFT names).
    shapes: HashMap<String, Vec<usize>>,
    /// Every sharded tensor's shard: the trained ones share their `Var`'s storage, so they
    /// follow the optimizer's updates.
    shards: HashMap<String, Tensor>,
    /// Names of layer i's sharded tensors, sorted.
    layers: Vec<Vec<String>>,
    /// The embedding and the output head (sharded, gathered for each use).
    outer: Vec<String>,
    /// The trained tensors held whole for a step (full fine-tuning: the final norm), each with
    /// the full `Var` the decoder reads.
    root: Vec<(String, Var)>,
    trained: std::collections::HashSet<String>,
    /// This step's gradient shards so far.
    grads: Mutex<HashMap<String, Tensor>>,
    /// Seconds spent in collectives since `take_collective_seconds`.
    collective_s: Mutex<f64>,
    /// The next layer's all-gather, started while the current layer computes ([`LayerSource::prefetch`]).
    next: Mutex<Option<(usize, Started)>>,
    /// Layer gathers since `take_prefetched_share`: all, and those a prefetch had started.
    gathers: Mutex<(usize, usize)>,
    /// Whether `prefetch` starts gathers (`DPO_SHARD_PREFETCH=0` turns it off, to measure it).
    prefetching: bool,
    /// A 4-bit base (QLoRA): each packed weight is held whole by one rank (its owner), which
    /// hands it to the others when its layer runs.
    quant: Quant,
}

/// All-gathers of some sharded tensors, under way: one a tensor, each straight into the
/// storage of the whole tensor it makes (no reassembly copy), in the shards' dtype.
struct Started(Vec<(String, PendingGather)>);

/// The 4-bit weights: layer i's names and owners, and the ones this rank holds.
#[derive(Default)]
pub struct Quant {
    pub layers: Vec<Vec<(String, usize)>>,
    pub held: HashMap<String, Arc<Quant4>>,
    pub device: Option<Device>,
}

// SAFETY: the collectives run only on the thread that trains (MPI is initialised Funneled);
// candle calls the decoder's backward ops on the thread that called `backward`. Nothing here
// is touched by rayon's workers.
unsafe impl Send for Sharded {}
unsafe impl Sync for Sharded {}

/// The layer a tensor belongs to (`<prefix>layers.<i>.…`), if any.
pub fn layer_of(name: &str, cfg: &ModelConfig) -> Option<usize> {
    name.strip_prefix(&format!("{}layers.", cfg.prefix))?.split('.').next()?.parse().ok()
}

impl Sharded {
    /// From this rank's `shards` (and the tensors' `shapes`) and the tensors read whole
    /// (`root_full`); `names` are the trained ones. Returns the sharded set, the trained shards
    /// as `Var`s (in `names` order) and the whole tensors the decoder holds (the trained ones
    /// as the root `Var`s' tensors).
    pub fn build(
        cfg: &ModelConfig,
        world: &World,
        shapes: HashMap<String, Vec<usize>>,
        shards: HashMap<String, Tensor>,
        root_full: HashMap<String, Tensor>,
        names: &[String],
    ) -> Result<(Self, Vec<Var>, HashMap<String, Tensor>)> {
        let mut shards = shards;
        let mut vars = Vec::with_capacity(names.len());
        for n in names {
            let v = Var::from_tensor(shards.get(n).with_context(|| format!("no shard of `{n}`"))?)?;
            shards.insert(n.clone(), v.as_tensor().clone());
            vars.push(v);
        }
        let trained: std::collections::HashSet<String> = names.iter().cloned().collect();
        let mut layers = vec![Vec::new(); cfg.num_hidden_layers];
        let mut outer = Vec::new();
        for n in shards.keys() {
            match layer_of(n, cfg) {
                Some(i) => layers[i].push(n.clone()),
                None => outer.push(n.clone()),
            }
        }
        layers.iter_mut().for_each(|l| l.sort());
        let mut root = Vec::new();
        let mut decoder_tensors = HashMap::new();
        let mut root_names: Vec<&String> = root_full.keys().collect();
        root_names.sort();
        for n in root_names {
            let t = &root_full[n];
            if trained.contains(n) {
                let v = Var::from_tensor(t)?;
                decoder_tensors.insert(n.clone(), v.as_tensor().clone());
                root.push((n.clone(), v));
            } else {
                decoder_tensors.insert(n.clone(), t.clone());
            }
        }
        let s = Sharded {
            world: world.clone(),
            shapes,
            shards,
            layers,
            outer,
            root,
            trained,
            grads: Mutex::new(HashMap::new()),
            collective_s: Mutex::new(0.0),
            next: Mutex::new(None),
            gathers: Mutex::new((0, 0)),
            prefetching: std::env::var("DPO_SHARD_PREFETCH").map_or(true, |v| v.trim() != "0"),
            quant: Quant::default(),
        };
        Ok((s, vars, decoder_tensors))
    }

    /// Adds a 4-bit base's weights.
    pub fn with_quant(mut self, quant: Quant) -> Self {
        self.quant = quant;
        self
    }

    /// Layer i's 4-bit weights, each from the rank that holds it (a broadcast each).
    fn gather_quant(&self, layer: usize) -> Result<Option<Arc<crate::model::quant::QuantWeights>>> {
        let Some(names) = self.quant.layers.get(layer).filter(|l| !l.is_empty()) else { return Ok(None) };
        let mut out = crate::model::quant::QuantWeights::new();
        for (name, owner) in names {
            let q = if *owner == self.world.rank {
                let q = self.quant.held.get(name).with_context(|| format!("4-bit `{name}` is not held here"))?.clone();
                self.timed(|| self.world.broadcast_bytes(&mut q.to_bytes(), *owner));
                q
            } else {
                let mut bytes = Vec::new();
                self.timed(|| self.world.broadcast_bytes(&mut bytes, *owner));
                let mut q = Quant4::from_bytes(&bytes).with_context(|| format!("4-bit `{name}` from rank {owner}"))?;
                if let Some(d) = &self.quant.device {
                    q.place(d)?;
                }
                Arc::new(q)
            };
            out.insert(name.clone(), q);
        }
        Ok(Some(Arc::new(out)))
    }

    /// Seconds in this rank's gathers, reduce-scatters and broadcasts since the last call.
    pub fn take_collective_seconds(&self) -> f64 {
        std::mem::take(&mut *self.collective_s.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The share of layer gathers since the last call that a prefetch had started (None: none).
    pub fn take_prefetched_share(&self) -> Option<f64> {
        let (all, hits) = std::mem::take(&mut *self.gathers.lock().unwrap_or_else(|e| e.into_inner()));
        (all > 0).then(|| hits as f64 / all as f64)
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let out = f();
        *self.collective_s.lock().unwrap_or_else(|e| e.into_inner()) += t.elapsed().as_secs_f64();
        out
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    fn numel(&self, name: &str) -> usize {
        self.shapes[name].iter().product()
    }

    /// These tensors whole, from every rank's shard: an all-gather a tensor.
    fn gather_names(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let started = self.start_gather(names)?;
        self.finish_gather(started)
    }

    /// These tensors' all-gathers, started.
    fn start_gather(&self, names: &[String]) -> Result<Started> {
        let started = names.iter().map(|n| Ok((n.clone(), self.timed(|| self.world.start_all_gather(&self.shards[n]))?))).collect::<Result<_>>()?;
        Ok(Started(started))
    }

    /// The tensors of a started gather whole, once it is done (waiting counts as collective time).
    /// A whole tensor is its ranks' padded chunks end to end: its first n elements, a view.
    fn finish_gather(&self, started: Started) -> Result<HashMap<String, Tensor>> {
        started
            .0
            .into_iter()
            .map(|(n, pending)| {
                let full = self.timed(|| pending.wait())?.narrow(0, 0, self.numel(&n))?.reshape(self.shapes[&n].as_slice())?;
                Ok((n, full))
            })
            .collect()
    }

    /// Layer i's dense weights whole: from the prefetch if it gathered this layer, else now. A
    /// prefetch of another layer (a guess the caller did not follow) is finished and dropped:
    /// every rank started it, so every rank must complete it.
    fn layer_tensors(&self, layer: usize) -> Result<HashMap<String, Tensor>> {
        let next = self.next.lock().unwrap_or_else(|e| e.into_inner()).take();
        let hit = next.as_ref().is_some_and(|(i, _)| *i == layer);
        {
            let mut g = self.gathers.lock().unwrap_or_else(|e| e.into_inner());
            *g = (g.0 + 1, g.1 + hit as usize);
        }
        if let Some((_, started)) = next {
            let got = self.finish_gather(started)?;
            if hit {
                return Ok(got);
            }
        }
        self.gather_names(&self.layers[layer])
    }

    /// Completes and drops an outstanding prefetch (its weights are stale once the shards change).
    fn drop_prefetch(&self) -> Result<()> {
        if let Some((_, started)) = self.next.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.finish_gather(started)?;
        }
        Ok(())
    }

    /// Full gradients of these trained tensors (by name; a missing one is zero) summed over the
    /// ranks, each rank adding its shard to the step's: a reduce-scatter a tensor, straight from
    /// its gradient (padded only where its size does not divide by the world).
    fn reduce_names(&self, names: &[String], mut grads: HashMap<String, Tensor>) -> Result<()> {
        let w = self.world.size;
        for n in names {
            let (numel, c) = (self.numel(n), self.shards[n].elem_count());
            let device = self.shards[n].device();
            let g = match grads.remove(n) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(numel, DType::F32, device)?,
            };
            let g = if c * w > numel { Tensor::cat(&[&g, &Tensor::zeros(c * w - numel, DType::F32, device)?], 0)? } else { g };
            let mine = self.timed(|| self.world.reduce_scatter(&g))?.to_dtype(self.shards[n].dtype())?;
            drop(g);
            let mut acc = self.grads.lock().unwrap_or_else(|e| e.into_inner());
            let sum = match acc.remove(n) {
                Some(old) => (old + mine)?,
                None => mine,
            };
            acc.insert(n.clone(), sum);
        }
        Ok(())
    }

    /// After an optimizer step (and on restore): the root unit's full tensors from the shards.
    pub fn refresh_root(&self) -> Result<()> {
        self.drop_prefetch()?;
        let names: Vec<String> = self.root.iter().map(|(n, _)| n.clone()).collect();
        let full = self.gather_names(&names)?;
        for (n, v) in &self.root {
            v.set(&full[n])?;
        }
        Ok(())
    }

    /// After a backward: the root unit's gradients (from the outer graph) reduce-scattered.
    pub fn reduce_root(&self, grads: &GradStore) -> Result<()> {
        let names: Vec<String> = self.root.iter().map(|(n, _)| n.clone()).collect();
        let got = self.root.iter().filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone()))).collect();
        self.reduce_names(&names, got)
    }

    /// The step's gradient shards in `names` order (zero where none arrived), cleared.
    pub fn take_grads(&self, names: &[String]) -> Result<Vec<Tensor>> {
        let mut acc = std::mem::take(&mut *self.grads.lock().unwrap_or_else(|e| e.into_inner()));
        names
            .iter()
            .map(|n| {
                Ok(match acc.remove(n) {
                    Some(g) => g,
                    None => self.shards[n].zeros_like()?,
                })
            })
            .collect()
    }

    /// Bytes a rank holds beyond its shards at a step's peak: the root unit's gradients, and the
    /// largest gathered unit (a layer, the embedding or the head) with its gradient and the
    /// backward's copy of it, and the next layer's prefetched weights.
    pub fn transient_bytes(&self) -> u64 {
        let bytes = |n: &String| (self.numel(n) * 4) as u64;
        let root: u64 = self.root.iter().map(|(n, _)| bytes(n)).sum();
        let layer = self.layers.iter().map(|l| l.iter().map(bytes).sum::<u64>()).max().unwrap_or(0);
        let outer = self.outer.iter().map(bytes).max().unwrap_or(0);
        root + 3 * layer.max(outer) + if self.prefetching { layer } else { 0 }
    }

    /// Bytes of this rank's frozen shards (the base under LoRA) and 4-bit weights.
    pub fn frozen_shard_bytes(&self) -> u64 {
        self.shards.iter().filter(|(n, _)| !self.trained.contains(*n)).map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum::<u64>()
            + self.quant.held.values().map(|q| q.bytes() as u64).sum::<u64>()
    }

    pub fn total_params(&self, names: &[String]) -> u64 {
        names.iter().map(|n| self.numel(n) as u64).sum()
    }

    /// Every rank calls this with the same names: `f` gets each trained tensor whole on rank 0,
    /// gathered one at a time (never the whole model on one rank).
    pub fn each_whole(&self, names: &[String], mut f: impl FnMut(&str, Tensor) -> Result<()>) -> Result<()> {
        for n in names {
            let t = self.gather_one(n)?;
            if self.world.is_root() {
                f(n, t)?;
            }
        }
        Ok(())
    }

    /// Sets the trained shards from whole tensors (a checkpoint), each rank taking its span.
    pub fn set_from(&self, names: &[String], vars: &[Var], whole: impl Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (n, v) in names.iter().zip(vars) {
            v.set(&shard_of(&whole(n)?.to_dtype(v.dtype())?, self.world.size, self.world.rank)?)?;
        }
        self.refresh_root()
    }

    /// Writes this rank's moments (`m.<name>`, `v.<name>` over its span, unpadded) into `dir`,
    /// and on rank 0 the index: the world size and every tensor's element count.
    pub fn save_moments(&self, dir: &Path, names: &[String], moments: &[(Tensor, Tensor)]) -> Result<()> {
        let mut out = BTreeMap::new();
        for (n, (m, v)) in names.iter().zip(moments) {
            let len = span(self.numel(n), self.world.size, self.world.rank).len();
            out.insert(format!("m.{n}"), m.narrow(0, 0, len)?);
            out.insert(format!("v.{n}"), v.narrow(0, 0, len)?);
        }
        crate::model::weights::save_weights(&dir.join(optimizer_file(self.world.rank, self.world.size)), &out, DType::F32)?;
        if self.world.is_root() {
            let numel: BTreeMap<&String, usize> = names.iter().map(|n| (n, self.numel(n))).collect();
            let index = serde_json::json!({ "world_size": self.world.size, "numel": numel });
            crate::store::write_atomic(&dir.join(OPTIMIZER_INDEX), serde_json::to_string_pretty(&index)?.as_bytes())?;
        }
        Ok(())
    }
}

/// A trained tensor that rank 0's safetensors writer gathers when it reaches it: rank 0 first
/// tells the other ranks which (they wait in `Policy::save`), then all gather it.
pub struct WholeView<'a> {
    sharded: &'a Sharded,
    names: &'a [String],
    index: usize,
    shape: Vec<usize>,
}

impl<'a> WholeView<'a> {
    pub fn new(sharded: &'a Sharded, names: &'a [String], index: usize) -> Self {
        let shape = sharded.shapes[&names[index]].clone();
        WholeView { sharded, names, index, shape }
    }
}

impl safetensors::View for WholeView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let s = self.sharded;
        s.world.broadcast_f64(&mut [self.index as f64], 0);
        let mut bytes = Vec::new();
        let got = s.each_whole(std::slice::from_ref(&self.names[self.index]), |_, t| {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok(())
        });
        // The writer's interface has no error path; a failed gather ends this rank, and the
        // launcher the others.
        if let Err(e) = got {
            eprintln!("error: rank 0: gathering `{}` to save it: {e:#}", self.names[self.index]);
            s.world.abort(1);
        }
        bytes.into()
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

impl LayerSource for Sharded {
    fn gather(&self, layer: usize) -> Result<Gathered> {
        let names = &self.layers[layer];
        Ok(Gathered {
            tensors: self.layer_tensors(layer)?,
            trained: names.iter().filter(|n| self.trained.contains(*n)).cloned().collect(),
            quantized: self.gather_quant(layer)?,
        })
    }

    fn prefetch(&self, layer: usize) -> Result<()> {
        if !self.prefetching || self.world.size == 1 || layer >= self.layers.len() {
            return Ok(());
        }
        self.drop_prefetch()?;
        let started = self.start_gather(&self.layers[layer])?;
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some((layer, started));
        Ok(())
    }

    fn reduce(&self, layer: usize, grads: HashMap<String, Tensor>) -> Result<()> {
        let names: Vec<String> = self.layers[layer].iter().filter(|n| self.trained.contains(*n)).cloned().collect();
        self.reduce_names(&names, grads)
    }

    fn gather_one(&self, name: &str) -> Result<Tensor> {
        let name = name.to_string();
        anyhow::ensure!(self.shards.contains_key(&name), "`{name}` is not sharded");
        Ok(self.gather_names(std::slice::from_ref(&name))?.remove(&name).expect("gathered"))
    }

    fn reduce_one(&self, name: &str, grad: Tensor) -> Result<()> {
        if !self.trains(name) {
            return Ok(());
        }
        self.reduce_names(&[name.to_string()], [(name.to_string(), grad)].into())
    }

    fn trains(&self, name: &str) -> bool {
        self.trained.contains(name)
    }
}

/// A checkpoint's AdamW moments, whichever layout wrote them: one `optimizer.safetensors` of
/// whole tensors, or a sharded run's per-rank files and index. Reads any element range.
pub struct Moments {
    files: Vec<candle_core::safetensors::MmapedSafetensors>,
    /// The writing run's world size (1 for the whole-tensor file).
    world: usize,
    dir: std::path::PathBuf,
}

impl Moments {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(OPTIMIZER_INDEX);
        let (world, paths) = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
            let w = v["world_size"].as_u64().with_context(|| format!("{}: no world_size", index.display()))? as usize;
            (w, (0..w).map(|r| dir.join(optimizer_file(r, w))).collect::<Vec<_>>())
        } else {
            (1, vec![dir.join("optimizer.safetensors")])
        };
        let files = paths
            .iter()
            // SAFETY: checkpoint files are ours and not modified while mapped.
            .map(|p| unsafe { candle_core::safetensors::MmapedSafetensors::new(p) }.with_context(|| format!("cannot read {}", p.display())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Moments { files, world, dir: dir.to_path_buf() })
    }

    /// `which` ("m" or "v") of tensor `name` (n elements), elements `range`, flat f32.
    pub fn range(&self, which: &str, name: &str, n: usize, range: Range<usize>, device: &Device) -> Result<Tensor> {
        let key = format!("{which}.{name}");
        let mut parts = Vec::new();
        for (r, st) in self.files.iter().enumerate() {
            let s = span(n, self.world, r);
            let (a, b) = (range.start.max(s.start), range.end.min(s.end));
            if a >= b {
                continue;
            }
            let t = st.load(&key, device).with_context(|| format!("{}: {key} missing from the optimizer state", self.dir.display()))?;
            parts.push(t.flatten_all()?.narrow(0, a - s.start, b - a)?.to_dtype(DType::F32)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// This rank's padded shard of one moment.
    pub fn shard(&self, which: &str, name: &str, n: usize, world: usize, rank: usize, device: &Device) -> Result<Tensor> {
        let t = self.range(which, name, n, span(n, world, rank), device)?;
        let pad = chunk(n, world) - t.elem_count();
        Ok(if pad == 0 { t } else { Tensor::cat(&[&t, &Tensor::zeros(pad, DType::F32, device)?], 0)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_every_element_once() {
        for (n, w) in [(10, 3), (3, 4), (1, 2), (12, 4), (7, 1)] {
            let mut seen = vec![0; n];
            for r in 0..w {
                let s = span(n, w, r);
                assert!(s.len() <= chunk(n, w));
                s.for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&c| c == 1), "n {n} w {w}: {seen:?}");
        }
        let t = Tensor::arange(0f32, 10.0, &Device::Cpu).unwrap().reshape((2, 5)).unwrap();
        assert_eq!(shard_of(&t, 3, 2).unwrap().to_vec1::<f32>().unwrap(), vec![8.0, 9.0, 0.0, 0.0]);
        assert_eq!(shard_of(&t, 3, 1).unwrap().to_vec1::<f32>().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
        // A shard owns storage of its own size, never the full tensor's (else every rank would
        // hold the model).
        let big = Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap();
        let part = shard_of(&big, 4, 1).unwrap();
        let (storage, _) = part.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(c) => assert_eq!(c.as_slice::<f32>().unwrap().len(), 250),
            _ => unreachable!(),
        }
    }
}
