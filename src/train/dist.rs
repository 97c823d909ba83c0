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
    fn sum<T: mpi::datatype::Equivalence + Copy + Default + std::ops::AddAssign>(&self, v: &mut [T]) {
        use mpi::collective::SystemOperation;
        use mpi::traits::{Communicator, CommunicatorCollectives, Root};
        let Some(m) = &self.mpi else { return };
        if v.len() >= RING_MIN {
            // A ring reduce-scatter, then each rank's summed block to every rank: each block is
            // summed on one rank in one order, so every rank still holds the same bits.
            let c = v.len().div_ceil(self.size);
            let mut padded = v.to_vec();
            padded.resize(c * self.size, T::default());
            let mine = ring_reduce_scatter(&m.comm, self.rank, self.size, padded);
            let mut all = vec![T::default(); c * self.size];
            m.comm.all_gather_into(&mine[..], &mut all[..]);
            v.copy_from_slice(&all[..v.len()]);
            return;
        }
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
    /// ZeRO-3: every rank's flat f32 `shard` [c] concatenated in rank order [W·c], at once (the
    /// engines without a non-blocking gather; MPI's is [`World::start_all_gather`]).
    fn all_gather(&self, shard: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(shard.clone());
        }
        #[cfg(feature = "nccl")]
        if let Some(n) = &self.nccl {
            return n.all_gather_tensor(shard, self.size);
        }
        bail!("no engine to gather shards over {} ranks", self.size)
    }

    /// Every rank's flat `shard` [c] concatenated in rank order [W·c], in the shard's dtype:
    /// started now and finished by [`PendingGather::wait`], so the transfer can run while the
    /// caller computes (ZeRO-3's prefetch of the next layer). Over MPI a non-blocking all-gather
    /// (MPI_Iallgather) straight into the buffer the result keeps; the other engines gather at
    /// once.
    pub fn start_all_gather(&self, shard: &Tensor) -> Result<PendingGather> {
        #[cfg(feature = "mpi")]
        if let (Some(m), true) = (&self.mpi, self.size > 1) {
            return Ok(PendingGather(Pending::Mpi(match shard.dtype() {
                DType::F32 => MpiGather::start::<f32>(&m.comm, shard, self.size)?,
                DType::BF16 => MpiGather::start::<half::bf16>(&m.comm, shard, self.size)?,
                DType::F16 => MpiGather::start::<half::f16>(&m.comm, shard, self.size)?,
                DType::F64 => MpiGather::start::<f64>(&m.comm, shard, self.size)?,
                dt => bail!("no all-gather of {dt:?} shards"),
            })));
        }
        let full = self.all_gather(&shard.to_dtype(DType::F32)?)?.to_dtype(shard.dtype())?;
        Ok(PendingGather(Pending::Done(full)))
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
            let mine = ring_reduce_scatter(&m.comm, self.rank, self.size, full.to_vec1::<f32>()?);
            return Ok(Tensor::from_vec(mine, c, full.device())?);
        }
        let _ = c;
        bail!("no engine to reduce-scatter over {} ranks", self.size)
    }
}

/// Sums of at least this many elements go round a ring ([`ring_reduce_scatter`]); shorter ones
/// (metrics, norms) reduce to rank 0 and come back by broadcast, two messages.
#[cfg(feature = "mpi")]
const RING_MIN: usize = 1 << 16;

/// `v` [W·c] holds one block of c per rank; returns this rank's block summed over every rank.
/// A ring: W − 1 exchanges of one block with the neighbours, each rank adding what it receives
/// to its own, so every rank sends and adds (W − 1)/W of the vector, all at once. Open MPI's
/// MPI_Reduce_scatter_block and its reduce + broadcast (4.1, shared memory) sum the whole
/// vector on one rank: at Qwen2.5-0.5B's shape on 2 ranks they took 5 s (ZeRO-3) and ~7 s
/// (ZeRO-1, data parallel) of a step whose compute is under 3 s.
#[cfg(feature = "mpi")]
fn ring_reduce_scatter<T: mpi::datatype::Equivalence + Copy + Default + std::ops::AddAssign>(
    comm: &mpi::topology::SimpleCommunicator,
    r: usize,
    w: usize,
    mut v: Vec<T>,
) -> Vec<T> {
    use mpi::traits::Communicator;
    let c = v.len() / w;
    let (next, prev) = (comm.process_at_rank(((r + 1) % w) as i32), comm.process_at_rank(((r + w - 1) % w) as i32));
    let mut got = vec![T::default(); c];
    for step in 0..w - 1 {
        // Step s sends block r − 1 − s (at s > 0 the sum received at s − 1) and receives block
        // r − 2 − s: the last one received is block r, summed over every rank.
        let (send, recv) = ((r + 2 * w - 1 - step) % w, (r + 2 * w - 2 - step) % w);
        mpi::point_to_point::send_receive_into(&v[send * c..(send + 1) * c], &next, &mut got[..], &prev);
        v[recv * c..(recv + 1) * c].iter_mut().zip(&got).for_each(|(a, b)| *a += *b);
    }
    v.truncate((r + 1) * c);
    v.split_off(r * c)
}

/// An all-gather under way: [`World::start_all_gather`].
pub struct PendingGather(Pending);

enum Pending {
    Done(Tensor),
    #[cfg(feature = "mpi")]
    Mpi(MpiGather),
}

/// An MPI_Iallgather and the buffers it reads and writes, owned here until it is done.
#[cfg(feature = "mpi")]
struct MpiGather {
    request: mpi::ffi::MPI_Request,
    _send: Box<dyn std::any::Any>,
    /// Makes the result from the receive buffer it owns.
    result: Option<Box<dyn FnOnce() -> Result<Tensor>>>,
}

#[cfg(feature = "mpi")]
impl MpiGather {
    fn start<T: candle_core::WithDType>(comm: &mpi::topology::SimpleCommunicator, shard: &Tensor, world: usize) -> Result<Self> {
        use mpi::raw::AsRaw;
        let send: Vec<T> = shard.flatten_all()?.to_vec1()?;
        let mut recv = vec![T::zero(); send.len() * world];
        // Elements move as opaque words of their size (no conversion: bf16 travels as 16 bits).
        // SAFETY: reading MPI's datatype handles (extern statics).
        let datatype = unsafe {
            match std::mem::size_of::<T>() {
                2 => mpi::ffi::RSMPI_UINT16_T,
                4 => mpi::ffi::RSMPI_FLOAT,
                8 => mpi::ffi::RSMPI_DOUBLE,
                n => bail!("no all-gather of {n}-byte elements"),
            }
        };
        let count = i32::try_from(send.len()).map_err(|_| anyhow::anyhow!("a gathered shard of {} elements is past MPI's count", send.len()))?;
        let mut request = std::mem::MaybeUninit::uninit();
        // SAFETY: both buffers are owned by the returned value and never move (a Vec's heap
        // block stays put when the Vec does); it waits for the request before freeing them.
        unsafe {
            mpi::ffi::MPI_Iallgather(
                send.as_ptr().cast(),
                count,
                datatype,
                recv.as_mut_ptr().cast(),
                count,
                datatype,
                comm.as_raw(),
                request.as_mut_ptr(),
            );
        }
        let device = shard.device().clone();
        Ok(MpiGather {
            // SAFETY: MPI_Iallgather set it.
            request: unsafe { request.assume_init() },
            _send: Box::new(send),
            result: Some(Box::new(move || {
                let n = recv.len();
                Ok(Tensor::from_vec(recv, n, &device)?)
            })),
        })
    }

    fn wait(&mut self) {
        // SAFETY: a request MPI_Iallgather made, waited for once (MPI_Wait sets it to null).
        unsafe {
            if self.request != mpi::ffi::RSMPI_REQUEST_NULL {
                mpi::ffi::MPI_Wait(&mut self.request, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
        }
    }
}

#[cfg(feature = "mpi")]
impl Drop for MpiGather {
    /// MPI may still be writing into the buffers: never free them before it is done.
    fn drop(&mut self) {
        self.wait();
    }
}

impl PendingGather {
    /// Every rank's shard concatenated in rank order, as [`World::all_gather`] returns it.
    pub fn wait(self) -> Result<Tensor> {
        match self.0 {
            Pending::Done(t) => Ok(t),
            #[cfg(feature = "mpi")]
            Pending::Mpi(mut g) => {
                g.wait();
                g.result.take().expect("made once")()
            }
        }
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
