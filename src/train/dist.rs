//! Data-parallel training: this process's rank among those a launcher started, and the few
//! collectives `train` needs (sums, a max, broadcasts, a barrier), over MPI (the `mpi` cargo
//! feature: rsmpi over the system's MPI) or NCCL (`nccl`, with `cuda`: gradients summed on the
//! GPUs; see `nccl.rs`). One process is a world of size 1 whose collectives
//! do nothing, so the single-process path is the same code.
//!
//! Sums reduce to rank 0 and broadcast the result, so every rank holds the same bits (an
//! all-reduce may add in a different order on different ranks), and the replicated parameters
//! stay identical without ever being compared.
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Gradients are reduced in buckets of this many bytes (fewer, larger messages than one per
/// parameter; bounded extra host memory).
const BUCKET_BYTES: usize = 25 << 20;

/// This process's place among the training processes. Cloning it shares the connection (the
/// fully sharded decoder's layers hold one to gather their weights; Rc, as collectives run only
/// on the training thread).
#[derive(Clone)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<std::rc::Rc<Mpi>>,
    #[cfg(feature = "nccl")]
    nccl: Option<std::rc::Rc<super::nccl::Nccl>>,
}

#[cfg(feature = "mpi")]
struct Mpi {
    comm: mpi::topology::SimpleCommunicator,
    // Dropped last: MPI_Finalize.
    _universe: mpi::environment::Universe,
}

/// The launcher's rank and world size, from its environment variables (the design note's
/// table): Open MPI's mpirun, MPICH/Intel MPI (PMI), Slurm's srun (inside a job step only:
/// an sbatch script's own shell has SLURM_NTASKS but is one process), torchrun.
pub fn launched() -> Option<(usize, usize, &'static str)> {
    let get = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun"),
        ("PMI_RANK", "PMI_SIZE", "an MPI launcher"),
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "srun"),
        ("RANK", "WORLD_SIZE", "torchrun"),
    ]
    .into_iter()
    .find_map(|(r, s, by)| Some((get(r)?, get(s)?, by)))
}

impl World {
    /// One process, no peers.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// The world this process was started into: one process unless a launcher started several,
    /// then MPI's (an error in a build without an engine, before anything is written: each rank
    /// would otherwise train alone into the same --out).
    pub fn from_env() -> Result<Self> {
        let Some((rank, size, by)) = launched().filter(|l| l.1 > 1) else { return Ok(Self::single()) };
        // NCCL where the launcher names a rendezvous (torchrun always does), else MPI.
        #[cfg(feature = "nccl")]
        if std::env::var_os("MASTER_ADDR").is_some() {
            let device = crate::model::device()?;
            let nccl = super::nccl::Nccl::connect(rank, size, &device)?;
            return Ok(World {
                rank,
                size,
                #[cfg(feature = "mpi")]
                mpi: None,
                nccl: Some(std::rc::Rc::new(nccl)),
            });
        }
        #[cfg(feature = "mpi")]
        if by != "torchrun" {
            return Self::mpi();
        }
        let build = if by == "torchrun" {
            "torchrun's variables name NCCL's rendezvous: start the ranks with torchrun on a CUDA build with NCCL \
             (scripts/build-cuda.sh), or with mpirun or srun on a build with `--features mpi`"
        } else {
            "rebuild with `cargo build --release --features mpi` (needs an MPI library: Debian's libopenmpi-dev and libclang-dev)"
        };
        bail!("started by {by} as rank {rank} of {size}, but this binary was built without data-parallel training: {build}")
    }

    #[cfg(feature = "mpi")]
    fn mpi() -> Result<Self> {
        use mpi::traits::Communicator;
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was already initialised in this process");
        };
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Ok(World {
            rank,
            size,
            mpi: Some(std::rc::Rc::new(Mpi { comm, _universe: universe })),
            #[cfg(feature = "nccl")]
            nccl: None,
        })
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Every rank's `v` summed elementwise, the same bits on every rank.
    pub fn sum_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.sum(v);
        }
        self.sum(v)
    }

    pub fn sum_f32(&self, v: &mut [f32]) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.sum(v);
        }
        self.sum(v)
    }

    /// The elementwise maximum over the ranks.
    pub fn max_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.max(v);
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let mut out = vec![0f64; v.len()];
            m.comm.all_reduce_into(&*v, &mut out[..], SystemOperation::max());
            v.copy_from_slice(&out);
        }
        let _ = v;
    }

    #[cfg(feature = "mpi")]
    fn sum<T: mpi::datatype::Equivalence + Copy + Default>(&self, v: &mut [T]) {
        use mpi::collective::SystemOperation;
        use mpi::traits::{Communicator, Root};
        let Some(m) = &self.mpi else { return };
        let root = m.comm.process_at_rank(0);
        if self.is_root() {
            let mut out = vec![T::default(); v.len()];
            root.reduce_into_root(&*v, &mut out[..], SystemOperation::sum());
            v.copy_from_slice(&out);
        } else {
            root.reduce_into(&*v, SystemOperation::sum());
        }
        root.broadcast_into(v);
    }

    #[cfg(not(feature = "mpi"))]
    fn sum<T>(&self, _v: &mut [T]) {}

    /// `v` as rank `root` has it, on every rank.
    pub fn broadcast_f32(&self, v: &mut [f32], root: usize) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.broadcast(v, root);
        }
        self.broadcast(v, root)
    }

    pub fn broadcast_f64(&self, v: &mut [f64], root: usize) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.broadcast(v, root);
        }
        self.broadcast(v, root)
    }

    #[cfg(feature = "mpi")]
    fn broadcast<T: mpi::datatype::Equivalence>(&self, v: &mut [T], root: usize) {
        use mpi::traits::{Communicator, Root};
        if let Some(m) = &self.mpi {
            m.comm.process_at_rank(root as i32).broadcast_into(v);
        }
    }

    #[cfg(not(feature = "mpi"))]
    fn broadcast<T>(&self, _v: &mut [T], _root: usize) {}

    /// Rank `root`'s bytes on every rank (ZeRO-3: a 4-bit weight from the rank holding it).
    pub fn broadcast_bytes(&self, v: &mut Vec<u8>, root: usize) {
        if self.size == 1 {
            return;
        }
        let mut len = [v.len() as f64];
        self.broadcast_f64(&mut len, root);
        v.resize(len[0] as usize, 0);
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.broadcast(&mut v[..], root);
        }
        self.broadcast(&mut v[..], root)
    }

    /// Rank 0's string on every rank.
    pub fn broadcast_string(&self, s: &mut String) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            let mut len = [s.len() as u64];
            n.broadcast(&mut len[..], 0);
            let mut bytes = if self.is_root() { s.as_bytes().to_vec() } else { vec![0u8; len[0] as usize] };
            n.broadcast(&mut bytes[..], 0);
            *s = String::from_utf8_lossy(&bytes).into_owned();
            return;
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::{Communicator, Root};
            let root = m.comm.process_at_rank(0);
            let mut len = [s.len() as u64];
            root.broadcast_into(&mut len[..]);
            let mut bytes = if self.is_root() { s.as_bytes().to_vec() } else { vec![0u8; len[0] as usize] };
            root.broadcast_into(&mut bytes[..]);
            *s = String::from_utf8_lossy(&bytes).into_owned();
        }
        let _ = s;
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) {
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.barrier();
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::CommunicatorCollectives;
            m.comm.barrier();
        }
    }

    /// Ends every rank's process (after a rank's error: the others may be waiting in a
    /// collective for it).
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::Communicator;
            m.comm.abort(code);
        }
        std::process::exit(code)
    }

    /// Every rank's tensors summed (the gradients: each rank's share of the global batch),
    /// reduced in buckets through host memory, the same bits on every rank.
    pub fn sum_tensors(&self, ts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.size == 1 || ts.is_empty() {
            return Ok(ts);
        }
        let dtype = ts[0].dtype();
        let per = dtype.size_in_bytes();
        let mut out = Vec::with_capacity(ts.len());
        let mut start = 0;
        while start < ts.len() {
            // A bucket: parameters in order until BUCKET_BYTES (at least one).
            let mut end = start;
            let mut bytes = 0;
            while end < ts.len() && (end == start || bytes + ts[end].elem_count() * per <= BUCKET_BYTES) {
                bytes += ts[end].elem_count() * per;
                end += 1;
            }
            let part = &ts[start..end];
            let flat = Tensor::cat(&part.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
            let summed = match dtype {
                #[cfg(feature = "nccl")]
                _ if self.nccl.is_some() => self.nccl.as_ref().expect("checked").sum_tensor(&flat.to_dtype(DType::F32)?)?.to_dtype(dtype)?,
                DType::F64 => {
                    let mut v: Vec<f64> = flat.to_vec1()?;
                    self.sum_f64(&mut v);
                    Tensor::from_vec(v, flat.shape(), flat.device())?
                }
                _ => {
                    let mut v: Vec<f32> = flat.to_dtype(DType::F32)?.to_vec1()?;
                    self.sum_f32(&mut v);
                    Tensor::from_vec(v, flat.shape(), flat.device())?.to_dtype(dtype)?
                }
            };
            let mut at = 0;
            for t in part {
                out.push(summed.narrow(0, at, t.elem_count())?.reshape(t.shape())?);
                at += t.elem_count();
            }
            start = end;
        }
        Ok(out)
    }

    /// `t` as rank `root` has it, on every rank (ZeRO-1: a parameter from the rank that
    /// updated it; moments gathered for a checkpoint).
    pub fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        let flat = t.flatten_all()?;
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return Ok(n.broadcast_tensor(&flat.to_dtype(DType::F32)?, root)?.to_dtype(t.dtype())?.reshape(t.shape())?);
        }
        Ok(match t.dtype() {
            DType::F64 => {
                let mut v: Vec<f64> = flat.to_vec1()?;
                self.broadcast_f64(&mut v, root);
                Tensor::from_vec(v, t.shape(), t.device())?
            }
            dt => {
                let mut v: Vec<f32> = flat.to_dtype(DType::F32)?.to_vec1()?;
                self.broadcast_f32(&mut v, root);
                Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(dt)?
            }
        })
    }
}

impl World {
    /// ZeRO-3: every rank's flat f32 `shard` [c] concatenated in rank order [W·c].
    pub fn all_gather(&self, shard: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(shard.clone());
        }
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.all_gather_tensor(shard, self.size);
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::traits::CommunicatorCollectives;
            let v: Vec<f32> = shard.to_vec1()?;
            let mut out = vec![0f32; v.len() * self.size];
            m.comm.all_gather_into(&v[..], &mut out[..]);
            return Ok(Tensor::from_vec(out, v.len() * self.size, shard.device())?);
        }
        bail!("no engine to gather shards over {} ranks", self.size)
    }

    /// ZeRO-3: `full` [W·c] holds one block of c per rank; every rank's blocks summed, this
    /// rank's block [c] (the gradients' reduce-scatter).
    pub fn reduce_scatter(&self, full: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(full.clone());
        }
        let c = full.elem_count() / self.size;
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.reduce_scatter_tensor(full, self.size);
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let v: Vec<f32> = full.to_vec1()?;
            let mut out = vec![0f32; c];
            m.comm.reduce_scatter_block_into(&v[..], &mut out[..], SystemOperation::sum());
            return Ok(Tensor::from_vec(out, c, full.device())?);
        }
        let _ = c;
        bail!("no engine to reduce-scatter over {} ranks", self.size)
    }
}

/// ZeRO-1: which rank keeps the AdamW moments of each parameter (and updates it): largest
/// parameters first, each to the rank holding the fewest elements so far, so the moments
/// split evenly. The same on every rank.
pub fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut load = vec![0usize; world.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("world >= 1");
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero1_owners_balance_the_elements() {
        let sizes = [100, 10, 60, 50, 5, 40];
        let o = super::owners(&sizes, 2);
        let load = |r| sizes.iter().zip(&o).filter(|(_, &x)| x == r).map(|(s, _)| s).sum::<usize>();
        assert_eq!(load(0) + load(1), 265);
        assert_eq!((load(0), load(1)), (140, 125), "largest first, each to the lighter rank: {o:?}");
        assert_eq!(super::owners(&sizes, 1), vec![0; 6]);
    }
}
