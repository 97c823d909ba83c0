//! The NCCL engine of data-parallel `train` (the `nccl` cargo feature, with `cuda`): ranks on
//! GPUs sum gradients on the device, without a trip through host memory.
//!
//! Started by torchrun (or srun with MASTER_ADDR/MASTER_PORT set): rank 0 makes NCCL's unique
//! id and hands it to the other ranks over TCP on MASTER_ADDR, port `DPO_NCCL_PORT` (default
//! MASTER_PORT + 1: torchrun's own store holds MASTER_PORT); NCCL does the rest. A collective
//! that waits longer than `DPO_COLLECTIVE_TIMEOUT` seconds (default 600: a peer died or hangs)
//! ends the process naming its rank; torchrun then stops the other ranks.
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    /// Unix seconds by which the running collective must return (0: none running).
    deadline: Arc<AtomicU64>,
    limit_s: u64,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where rank 0 hands out NCCL's unique id.
fn rendezvous() -> Result<(String, u16)> {
    let addr = std::env::var("MASTER_ADDR").context("NCCL ranks meet at MASTER_ADDR (torchrun sets it; with srun, export it)")?;
    let port = match std::env::var("DPO_NCCL_PORT") {
        Ok(p) => p.trim().parse().with_context(|| format!("DPO_NCCL_PORT={p}: not a port"))?,
        Err(_) => {
            let p = std::env::var("MASTER_PORT").context("NCCL ranks meet at MASTER_PORT + 1 (torchrun sets it; or set DPO_NCCL_PORT)")?;
            p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p}: not a port"))? + 1
        }
    };
    Ok((addr, port))
}

/// Rank 0: a new id, sent to the `size - 1` other ranks. Others: the id from rank 0.
fn exchange_id(rank: usize, size: usize) -> Result<Id> {
    let (addr, port) = rendezvous()?;
    let timeout = Duration::from_secs(300);
    if rank == 0 {
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("rank 0: cannot listen on port {port}"))?;
        for _ in 1..size {
            let (mut s, _) = listener.accept().context("rank 0: accepting a rank")?;
            s.write_all(&bytes).context("rank 0: sending the NCCL id")?;
        }
        return Ok(id);
    }
    let t = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect((addr.as_str(), port)) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < timeout => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("rank {rank}: rank 0 did not answer at {addr}:{port} within {} s: {e}", timeout.as_secs()),
        }
    };
    let mut bytes = [0u8; 128];
    s.read_exact(&mut bytes).with_context(|| format!("rank {rank}: reading the NCCL id from {addr}:{port}"))?;
    Ok(Id::uninit(bytes.map(|b| b as _)))
}

impl Nccl {
    /// Joins the ranks on the GPU `device` (this rank's local rank's).
    pub fn connect(rank: usize, size: usize, device: &candle_core::Device) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let id = exchange_id(rank, size)?;
        let comm = Comm::from_rank(stream.clone(), rank, size, id).map_err(|e| anyhow::anyhow!("rank {rank}: ncclCommInitRank: {e:?}"))?;
        let deadline = Arc::new(AtomicU64::new(0));
        let limit: u64 = std::env::var("DPO_COLLECTIVE_TIMEOUT").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(600);
        let watched = deadline.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(2));
            let d = watched.load(Ordering::Relaxed);
            if d != 0 && now_s() > d {
                eprintln!(
                    "error: rank {rank} of {size}: a collective waited more than {limit} s (DPO_COLLECTIVE_TIMEOUT): another rank died or hangs"
                );
                std::process::exit(1);
            }
        });
        Ok(Self { comm, stream, rank, deadline, limit_s: limit })
    }

    /// Runs one collective under the watchdog; an NCCL error ends the process naming the rank
    /// (the others would wait for it forever).
    fn run<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> T {
        self.deadline.store(now_s() + self.limit_s, Ordering::Relaxed);
        let out = f().and_then(|x| {
            self.stream.synchronize()?;
            Ok(x)
        });
        self.deadline.store(0, Ordering::Relaxed);
        match out {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: rank {}: NCCL {what}: {e:#}", self.rank);
                std::process::exit(1)
            }
        }
    }

    fn host_collective<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy>(
        &self,
        v: &mut [T],
        what: &str,
        op: impl FnOnce(&Comm, &mut CudaSlice<T>) -> Result<()>,
    ) {
        if v.is_empty() {
            return;
        }
        let out = self.run(what, || {
            let mut buf = self.stream.clone_htod(&*v)?;
            op(&self.comm, &mut buf)?;
            Ok(self.stream.clone_dtoh(&buf)?)
        });
        v.copy_from_slice(&out);
    }

    pub fn sum<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy>(&self, v: &mut [T]) {
        self.host_collective(v, "all-reduce", |c, b| nccl(c.all_reduce_in_place(b, &ReduceOp::Sum)))
    }

    pub fn max<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy>(&self, v: &mut [T]) {
        self.host_collective(v, "all-reduce (max)", |c, b| nccl(c.all_reduce_in_place(b, &ReduceOp::Max)))
    }

    pub fn broadcast<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy>(&self, v: &mut [T], root: usize) {
        self.host_collective(v, "broadcast", |c, b| nccl(c.broadcast_in_place(b, root as i32)))
    }

    pub fn barrier(&self) {
        self.sum(&mut [0f32]);
    }

    /// Every rank's f32 tensor summed on the device.
    pub fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.apply_op1_no_bwd(&DeviceCollective { nccl: self, kind: Kind::Sum })?)
    }

    /// Rank `root`'s f32 tensor on every rank.
    pub fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        Ok(t.apply_op1_no_bwd(&DeviceCollective { nccl: self, kind: Kind::Broadcast(root) })?)
    }

    /// ZeRO-3: every rank's flat f32 shard [c], concatenated in rank order [W·c].
    pub fn all_gather_tensor(&self, t: &Tensor, world: usize) -> Result<Tensor> {
        Ok(t.apply_op1_no_bwd(&DeviceCollective { nccl: self, kind: Kind::AllGather(world) })?)
    }

    /// ZeRO-3: this rank's block [c] of every rank's [W·c] summed.
    pub fn reduce_scatter_tensor(&self, t: &Tensor, world: usize) -> Result<Tensor> {
        Ok(t.apply_op1_no_bwd(&DeviceCollective { nccl: self, kind: Kind::ReduceScatter(world) })?)
    }
}

fn nccl<T>(r: Result<T, impl std::fmt::Debug>) -> Result<()> {
    r.map(|_| ()).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// What a [`DeviceCollective`] does (the world size where the output's length depends on it).
#[derive(Clone, Copy)]
enum Kind {
    Sum,
    Broadcast(usize),
    AllGather(usize),
    ReduceScatter(usize),
}

/// A collective as a candle op, so it reads and writes the tensors' device memory directly.
struct DeviceCollective<'a> {
    nccl: &'a Nccl,
    kind: Kind,
}

impl CustomOp1 for DeviceCollective<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take GPU tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("NCCL collectives take contiguous tensors") };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        // The tensor may come from another stream than NCCL's: let its work finish first.
        dev.cuda_stream().synchronize().map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        let n = &self.nccl;
        let len = end - start;
        let (what, out_len) = match self.kind {
            Kind::Sum => ("all-reduce", len),
            Kind::Broadcast(_) => ("broadcast", len),
            Kind::AllGather(w) => ("all-gather", len * w),
            Kind::ReduceScatter(w) => ("reduce-scatter", len / w),
        };
        let out = n.run(what, || {
            let mut out = n.stream.alloc_zeros::<f32>(out_len)?;
            match self.kind {
                Kind::Sum => nccl(n.comm.all_reduce(&src, &mut out, &ReduceOp::Sum))?,
                Kind::Broadcast(r) => nccl(n.comm.broadcast(Some(&src), &mut out, r as i32))?,
                Kind::AllGather(_) => nccl(n.comm.all_gather(&src, &mut out))?,
                Kind::ReduceScatter(_) => nccl(n.comm.reduce_scatter(&src, &mut out, &ReduceOp::Sum))?,
            }
            Ok(out)
        });
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(out_len)))
    }
}
