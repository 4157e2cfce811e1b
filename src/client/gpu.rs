//! The client's GPU path: one rank's batches copied into device memory with the CUDA
//! driver API (cudarc, feature `cuda`), for `millrace consume --device cuda:N`, `millrace
//! bench --gpu` and Rust trainers (candle, burn) that read millrace directly.
//!
//! - [`Gpu::open`] finds the driver at run time: [`driver_present`] first (cudarc panics
//!   on its first call when `libcuda.so` cannot be loaded), then `cuInit`, then the
//!   ordinal against the device count. Each failure is a [`GpuError`] that says why.
//! - [`RingRegistration`] page-locks the client's ring mapping once per connection. The
//!   mapping is a read-only `MAP_SHARED` memfd, so `CU_MEMHOSTREGISTER_READ_ONLY` first
//!   (docs/DESIGN.md: flag 0 fails on a `PROT_READ` mapping), then flag 0, then none:
//!   copies from pageable memory, 3-7x slower but correct. Each fallback is logged with
//!   the driver's reason. Unregistered on drop.
//! - [`DeviceSink`] copies each step's [`BatchView::copy_bytes`] (every array of the slot
//!   but the cursor, one contiguous range) into a device buffer on its own stream,
//!   asynchronously, and records an event after it. The caller keeps the slot unreleased
//!   (the client's `hold`) until [`DeviceSink::retire`] has seen that event complete, so
//!   the daemon never rewrites a slot the DMA is still reading.
//!
//! Without the `cuda` feature the same names exist, [`Gpu::open`] says so, and the
//! types that would hold device memory cannot be built.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::consume::Latency;
use super::{BatchView, Client};

/// Where `millrace consume` puts each batch: read in place, or copied to a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The ring's memory, read where it lies (today's consumer).
    #[default]
    Cpu,
    /// CUDA device `N` (`cuda:N`; `cuda` alone is `cuda:0`).
    Cuda(u32),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                    .parse()
                    .map(Device::Cuda)
                    .map_err(|_| format!("{s:?}: the device ordinal {n} is too large")),
                Some(n) => Err(format!(
                    "{s:?}: {n:?} is not a device ordinal (expected cuda:0, cuda:1, ...)"
                )),
                None => Err(format!(
                    "{s:?}: expected \"cpu\" or \"cuda:N\" (N a device ordinal)"
                )),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why the GPU path cannot run (or failed): typed, so `consume` can say which of "no
/// driver", "no such device" and "the driver refused" it was.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// This binary was built with `--no-default-features`.
    #[error("this millrace was built without the `cuda` feature")]
    NotBuilt,
    /// `libcuda.so` (the driver's user-space library) cannot be loaded.
    #[error("CUDA driver library not found (libcuda.so)")]
    NoDriver,
    /// `cuInit` failed (no GPU, driver and kernel module mismatch, ...).
    #[error("the CUDA driver did not initialize: {0}")]
    Init(String),
    /// The ordinal asked for is not among the devices the driver sees.
    #[error("no CUDA device {ordinal}: the driver sees {count}{}", listed(present))]
    NoDevice {
        /// The ordinal asked for.
        ordinal: u32,
        /// Devices the driver sees.
        count: i32,
        /// `cuda:N (name)` of each device the driver sees, so the message says which
        /// ordinals exist.
        present: Vec<String>,
    },
    /// A driver call failed.
    #[error("{what}: {error}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's error name and text.
        error: String,
    },
    /// The caller broke the sink's contract (a slot larger than its buffers, ...).
    #[error("{0}")]
    Usage(String),
    /// The bytes read back from the device differ from the slot's (`--verify`).
    #[error("step {step}: the device copy differs from the slot's bytes")]
    Mismatch {
        /// The step whose copy differs.
        step: u64,
    },
}

/// ` (cuda:0 (name), ...)`, or nothing when no device is listed.
fn listed(present: &[String]) -> String {
    if present.is_empty() {
        String::new()
    } else {
        format!(" ({})", present.join(", "))
    }
}

impl GpuError {
    /// Whether this machine cannot run the GPU path at all (a build without CUDA, no
    /// driver, a driver that sees no GPU): what `bench --gpu` skips on with exit 0. A
    /// bad ordinal on a machine with GPUs, or a driver call that fails, is an error.
    pub fn is_unavailable(&self) -> bool {
        match self {
            GpuError::NotBuilt | GpuError::NoDriver | GpuError::Init(_) => true,
            GpuError::NoDevice { count, .. } => *count <= 0,
            GpuError::Driver { .. } | GpuError::Usage(_) | GpuError::Mismatch { .. } => false,
        }
    }
}

/// How the ring's pages reached the driver: what every copy's speed depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pinning {
    /// Registered with `CU_MEMHOSTREGISTER_READ_ONLY`: DMA from the ring itself.
    ReadOnly,
    /// Registered with flag 0 (a writable mapping would get here).
    Plain,
    /// Not registered (the reasons are logged): the driver stages each copy.
    Pageable,
}

impl fmt::Display for Pinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pinning::ReadOnly => "registered read-only",
            Pinning::Plain => "registered",
            Pinning::Pageable => "pageable (registration failed)",
        })
    }
}

/// What `millrace consume --device cuda:N` measured, in its summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeviceFigures {
    /// `cuda:N (name)`.
    pub device: String,
    /// How the ring was pinned (`read_only`, `plain`, `pageable`).
    pub pinning: Option<Pinning>,
    /// Seconds the one registration took.
    pub register_s: f64,
    /// Host-to-device copies made (one per step).
    pub copies: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Median copy rate, GB/s, from CUDA events around each copy.
    pub copy_gb_per_s_p50: f64,
    /// From `next_batch` returning to the copy's event observed complete.
    pub ready_to_device: Latency,
    /// Copies read back and compared with the slot (`--verify-device`).
    pub verified: u64,
}

/// Whether the CUDA driver's user-space library can be loaded: the check before any
/// other CUDA call, since cudarc panics when its first call cannot load the library.
pub fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the library's usual names and closes it again.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    false
}

#[cfg(feature = "cuda")]
pub use imp::{DeviceBuffer, Gpu, PinnedBuffer, RingRegistration};

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;
    use std::time::Instant;

    use cudarc::driver::{
        result, sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError, PinnedHostSlice,
    };

    use super::{driver_present, GpuError, Pinning};

    /// The driver's name and text for an error, e.g. `CUDA_ERROR_NO_DEVICE (no
    /// CUDA-capable device is detected)`.
    pub(super) fn describe(e: DriverError) -> String {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned());
        let text = e.error_string().map(|s| s.to_string_lossy().into_owned());
        match (name, text) {
            (Ok(n), Ok(t)) => format!("{n} ({t})"),
            (Ok(n), Err(_)) => n,
            _ => format!("CUresult {}", e.0 as u32),
        }
    }

    /// Maps a driver error to [`GpuError::Driver`] saying what was being done.
    pub(super) fn drv(what: &'static str) -> impl FnOnce(DriverError) -> GpuError {
        move |e| GpuError::Driver {
            what,
            error: describe(e),
        }
    }

    /// One CUDA device opened for copies: its primary context and a stream of its own.
    pub struct Gpu {
        pub(super) ctx: Arc<CudaContext>,
        pub(super) stream: Arc<CudaStream>,
        ordinal: u32,
        name: String,
    }

    impl Gpu {
        /// Opens device `ordinal`, or says why it cannot (see [`GpuError`]).
        pub fn open(ordinal: u32) -> Result<Gpu, GpuError> {
            if !driver_present() {
                return Err(GpuError::NoDriver);
            }
            result::init().map_err(|e| GpuError::Init(describe(e)))?;
            let count = CudaContext::device_count().map_err(drv("counting devices"))?;
            if i64::from(ordinal) >= i64::from(count) {
                let present = (0..count)
                    .map(|i| {
                        let name = result::device::get(i)
                            .and_then(result::device::get_name)
                            .unwrap_or_else(describe);
                        format!("cuda:{i} ({name})")
                    })
                    .collect();
                return Err(GpuError::NoDevice {
                    ordinal,
                    count,
                    present,
                });
            }
            let ctx = CudaContext::new(ordinal as usize).map_err(drv("creating a context"))?;
            // One stream, ordered by the sink's own events: cudarc's per-buffer event
            // tracking would add two driver calls to every copy for nothing.
            // SAFETY: no buffer exists yet; every later one is used on `stream` only.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
            let name = ctx.name().unwrap_or_else(|_| "?".into());
            Ok(Gpu {
                ctx,
                stream,
                ordinal,
                name,
            })
        }

        /// `cuda:N (device name)`, for reports.
        pub fn label(&self) -> String {
            format!("cuda:{} ({})", self.ordinal, self.name)
        }

        /// A device buffer of `len` bytes (zeroed).
        pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, GpuError> {
            let buf = self
                .stream
                .alloc_zeros::<u8>(len.max(1))
                .map_err(drv("allocating device memory"))?;
            Ok(DeviceBuffer { buf, len })
        }

        /// A page-locked host buffer (`cuMemHostAlloc`, flag 0, as torch's
        /// `pin_memory`) holding a copy of `bytes`: the pinned reference of `bench --gpu`.
        pub fn pinned_copy(&self, bytes: &[u8]) -> Result<PinnedBuffer, GpuError> {
            // SAFETY: the memory is written whole below before anything reads it.
            let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.len(), 0) }
                .map_err(drv("allocating pinned host memory"))?;
            host.as_mut_slice()
                .map_err(drv("writing pinned host memory"))?
                .copy_from_slice(bytes);
            Ok(PinnedBuffer(host))
        }

        /// Enqueues a copy of `src` into the start of `dst` on this device's stream.
        pub fn copy_async(&self, src: &[u8], dst: &mut DeviceBuffer) -> Result<(), GpuError> {
            if src.len() > dst.len {
                return Err(GpuError::Usage(format!(
                    "a {}-byte copy into a {}-byte device buffer",
                    src.len(),
                    dst.len
                )));
            }
            let mut view = dst.buf.slice_mut(..src.len());
            self.stream
                .memcpy_htod(src, &mut view)
                .map_err(drv("host-to-device copy"))
        }

        /// An event on this device; `timing` for [`Gpu::elapsed_s`] (costs a little).
        pub fn event(&self, timing: bool) -> Result<CudaEvent, GpuError> {
            let flags = if timing {
                sys::CUevent_flags::CU_EVENT_DEFAULT
            } else {
                sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
            };
            self.ctx
                .new_event(Some(flags))
                .map_err(drv("creating an event"))
        }

        /// Records `event` after the work enqueued so far on this device's stream.
        pub fn record(&self, event: &CudaEvent) -> Result<(), GpuError> {
            event
                .record(&self.stream)
                .map_err(drv("recording an event"))
        }

        /// Seconds between two recorded timing events (waits for both).
        pub fn elapsed_s(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64, GpuError> {
            let ms = start.elapsed_ms(end).map_err(drv("timing events"))?;
            Ok(f64::from(ms) / 1e3)
        }

        /// Waits until the stream has done everything enqueued.
        pub fn synchronize(&self) -> Result<(), GpuError> {
            self.stream.synchronize().map_err(drv("synchronizing"))
        }

        /// The first `len` bytes of `src`, copied back to the host (waits).
        pub fn read_back(&self, src: &DeviceBuffer, len: usize) -> Result<Vec<u8>, GpuError> {
            let len = len.min(src.len);
            let mut out = vec![0u8; len];
            self.stream
                .memcpy_dtoh(&src.buf.slice(..len), &mut out)
                .map_err(drv("device-to-host copy"))?;
            self.synchronize()?;
            Ok(out)
        }
    }

    /// Device memory a slot is copied into.
    pub struct DeviceBuffer {
        buf: CudaSlice<u8>,
        len: usize,
    }

    impl DeviceBuffer {
        /// Bytes it holds.
        pub fn len(&self) -> usize {
            self.len
        }

        /// Whether it holds nothing.
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    }

    /// Page-locked host memory from `cuMemHostAlloc`, the reference a registered ring is
    /// measured against.
    pub struct PinnedBuffer(PinnedHostSlice<u8>);

    impl PinnedBuffer {
        /// Its bytes, to copy from with [`Gpu::copy_async`] like any host range. Take
        /// them once, outside a timed loop: cudarc's accessor waits on the buffer's
        /// event each call, a driver call the ring's copies do not make, and the
        /// pinned column of `bench --gpu` once paid it inside every timed copy.
        pub fn bytes(&self) -> Result<&[u8], GpuError> {
            self.0.as_slice().map_err(drv("reading pinned host memory"))
        }
    }

    /// A host range page-locked with `cuMemHostRegister` for the life of this value.
    pub struct RingRegistration {
        ctx: Arc<CudaContext>,
        ptr: usize,
        len: usize,
        pinning: Pinning,
        seconds: f64,
    }

    impl RingRegistration {
        /// Registers `ring` (the client's whole mapping): read-only flag, then flag 0,
        /// then none, each failure logged with the driver's reason. Never fails: a ring
        /// that cannot be pinned is still copied, from pageable memory.
        ///
        /// # Safety
        /// `ring`'s pages must stay mapped until the returned value is dropped (drop it
        /// before the client reconnects or is dropped): the driver keeps them pinned,
        /// and the drop unregisters by address, which after an unmap may be another
        /// mapping's.
        pub unsafe fn register(gpu: &Gpu, ring: &[u8]) -> RingRegistration {
            let t = Instant::now();
            let mut me = RingRegistration {
                ctx: gpu.ctx.clone(),
                ptr: ring.as_ptr() as usize,
                len: ring.len(),
                pinning: Pinning::Pageable,
                seconds: 0.0,
            };
            if let Err(e) = gpu.ctx.bind_to_thread() {
                tracing::warn!(
                    "ring not registered ({}): copies come from pageable memory",
                    describe(e)
                );
                return me;
            }
            let tries = [
                (sys::CU_MEMHOSTREGISTER_READ_ONLY, Pinning::ReadOnly),
                (0, Pinning::Plain),
            ];
            for (flag, pinning) in tries {
                // SAFETY: registers the pages of a live mapping of `len` bytes; the driver
                // only pins and reads them. Dropping this value unregisters them, and the
                // caller drops it before the mapping goes (this function's contract).
                let rc =
                    unsafe { sys::cuMemHostRegister_v2(ring.as_ptr() as *mut _, ring.len(), flag) };
                match rc.result() {
                    Ok(()) => {
                        me.pinning = pinning;
                        break;
                    }
                    Err(e) => tracing::warn!(
                        "cuMemHostRegister of the {}-byte ring with flags {flag} failed: {}{}",
                        ring.len(),
                        describe(e),
                        if flag == 0 {
                            "; copies come from pageable memory (3-7x slower)"
                        } else {
                            "; trying flag 0"
                        }
                    ),
                }
            }
            me.seconds = t.elapsed().as_secs_f64();
            me
        }

        /// How the ring ended up.
        pub fn pinning(&self) -> &Pinning {
            &self.pinning
        }

        /// Seconds the registration took.
        pub fn seconds(&self) -> f64 {
            self.seconds
        }
    }

    impl Drop for RingRegistration {
        fn drop(&mut self) {
            if self.pinning == Pinning::Pageable {
                return;
            }
            // cudarc's bind first hands back (and clears) an error an earlier call stored
            // (a failed free in a drop); skipping the unregister for it would leave the ring
            // pinned after its unmap, and a ring mapped later at the same address would
            // then fail to register. The second bind is the real one.
            let bound = self.ctx.bind_to_thread().or_else(|stored| {
                tracing::warn!(
                    "an earlier CUDA call failed (reported at the ring's unregister): {}",
                    describe(stored)
                );
                self.ctx.bind_to_thread()
            });
            let rc = bound.and_then(|()| {
                // SAFETY: `ptr` is the address this value registered.
                unsafe { sys::cuMemHostUnregister(self.ptr as *mut _) }.result()
            });
            if let Err(e) = rc {
                tracing::warn!(
                    "cuMemHostUnregister of the {}-byte ring: {}",
                    self.len,
                    describe(e)
                );
            }
        }
    }
}

/// One copy in flight: which lane's buffer, for which step, since when.
#[cfg(feature = "cuda")]
struct InFlight {
    lane: usize,
    step: u64,
    ready_ns: u64,
    bytes: usize,
    /// xxh3 of the slot's bytes when the copy is to be read back and compared.
    digest: Option<u64>,
}

/// A device buffer with the events around the copy into it.
#[cfg(feature = "cuda")]
struct Lane {
    buf: DeviceBuffer,
    start: cudarc::driver::CudaEvent,
    done: cudarc::driver::CudaEvent,
}

/// One rank's steps copied into device memory: the ring registered once, one
/// asynchronous copy per step into a rotating set of device buffers, the slot held until
/// the copy's event has completed. Owns the [`Gpu`]; keep it for the client's life and
/// call [`DeviceSink::unregister`] / [`DeviceSink::register`] around a reconnect.
#[cfg(feature = "cuda")]
pub struct DeviceSink {
    gpu: Gpu,
    reg: Option<RingRegistration>,
    lanes: Vec<Lane>,
    next: usize,
    inflight: std::collections::VecDeque<InFlight>,
    verify: bool,
    figures: DeviceFigures,
    copy_s: Vec<f64>,
    ready_ns: Vec<u64>,
}

#[cfg(feature = "cuda")]
impl DeviceSink {
    /// Registers `client`'s ring with `gpu` and allocates `depth` device buffers of the
    /// client's slot copy size (`depth`: copies that may be in flight, the client's hold
    /// + 1). With `verify`, every copy is read back and compared with the slot.
    ///
    /// # Safety
    /// The sink copies from the client's ring asynchronously and keeps it registered,
    /// which the types do not tie to the client, so the caller keeps two rules (as
    /// `millrace consume --device` does):
    /// - the ring stays mapped while registered: [`DeviceSink::unregister`] (or drop the
    ///   sink) before the client reconnects or is dropped;
    /// - no step is released while its copy is in flight: after each
    ///   [`DeviceSink::submit`], [`DeviceSink::retire`] down to the client's hold before
    ///   its next `next_batch` (which releases the steps older than the hold).
    pub unsafe fn new(
        gpu: Gpu,
        client: &Client,
        depth: usize,
        verify: bool,
    ) -> Result<DeviceSink, GpuError> {
        let size = client.copy_len();
        let mut lanes = Vec::new();
        for _ in 0..depth.max(1) {
            lanes.push(Lane {
                buf: gpu.alloc(size)?,
                start: gpu.event(true)?,
                done: gpu.event(true)?,
            });
        }
        let mut sink = DeviceSink {
            figures: DeviceFigures {
                device: gpu.label(),
                ..DeviceFigures::default()
            },
            gpu,
            reg: None,
            lanes,
            next: 0,
            inflight: Default::default(),
            verify,
            copy_s: Vec::new(),
            ready_ns: Vec::new(),
        };
        // SAFETY: this function's contract is the caller's.
        unsafe { sink.register(client)? };
        Ok(sink)
    }

    /// Reads every later copy back and compares it with the slot (or stops doing so).
    pub fn set_verify(&mut self, on: bool) {
        self.verify = on;
    }

    /// Registers `client`'s ring (after a connect or reconnect). A reconnect may bring
    /// a ring with larger slots (a daemon with a larger `[serve] stage_reserve_tokens`):
    /// buffers too small for its copies are allocated again, every copy into them
    /// having been retired by [`DeviceSink::unregister`].
    ///
    /// # Safety
    /// As [`DeviceSink::new`]: the ring stays mapped until [`DeviceSink::unregister`] or
    /// the sink's drop.
    pub unsafe fn register(&mut self, client: &Client) -> Result<(), GpuError> {
        let size = client.copy_len();
        if self.inflight.is_empty() {
            for lane in &mut self.lanes {
                if lane.buf.len() < size {
                    lane.buf = self.gpu.alloc(size)?;
                }
            }
        }
        // SAFETY: the caller keeps the ring mapped while it is registered (the contract).
        let reg = unsafe { RingRegistration::register(&self.gpu, client.ring_bytes()) };
        self.figures.pinning = Some(reg.pinning().clone());
        self.figures.register_s += reg.seconds();
        self.reg = Some(reg);
        Ok(())
    }

    /// Waits for every copy, then unregisters the ring: before the client's mapping
    /// goes away (a reconnect replaces it).
    pub fn unregister(&mut self) -> Result<(), GpuError> {
        let r = self.retire(0);
        self.reg = None;
        r
    }

    /// Enqueues the copy of `batch`'s slot (its [`BatchView::copy_bytes`]) and an event
    /// after it; `ready_ns` is when `next_batch` returned it. When every buffer is busy,
    /// the oldest copy is retired first.
    pub fn submit(&mut self, batch: &BatchView<'_>, ready_ns: u64) -> Result<(), GpuError> {
        if self.inflight.len() >= self.lanes.len() {
            self.retire(self.lanes.len() - 1)?;
        }
        let src = batch.copy_bytes;
        let i = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        let lane = &mut self.lanes[i];
        self.gpu.record(&lane.start)?;
        self.gpu.copy_async(src, &mut lane.buf)?;
        self.gpu.record(&lane.done)?;
        self.inflight.push_back(InFlight {
            lane: i,
            step: batch.step,
            ready_ns,
            bytes: src.len(),
            digest: self
                .verify
                .then(|| twox_hash::XxHash3_64::oneshot(batch.copy_bytes)),
        });
        Ok(())
    }

    /// Waits for the oldest copies until at most `keep` are in flight; their steps may
    /// then be released (the client's `hold` keeps the newer ones).
    pub fn retire(&mut self, keep: usize) -> Result<(), GpuError> {
        while self.inflight.len() > keep {
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            let lane = &self.lanes[f.lane];
            lane.done
                .synchronize()
                .map_err(imp::drv("waiting for a copy"))?;
            let now = super::monotonic_ns();
            self.ready_ns.push(now.saturating_sub(f.ready_ns));
            let s = self.gpu.elapsed_s(&lane.start, &lane.done)?;
            self.copy_s.push(s / f.bytes.max(1) as f64);
            self.figures.copies += 1;
            self.figures.bytes += f.bytes as u64;
            if let Some(want) = f.digest {
                let got = self.gpu.read_back(&lane.buf, f.bytes)?;
                if twox_hash::XxHash3_64::oneshot(&got) != want {
                    return Err(GpuError::Mismatch { step: f.step });
                }
                self.figures.verified += 1;
            }
        }
        Ok(())
    }

    /// The figures so far.
    pub fn figures(&self) -> DeviceFigures {
        let mut f = self.figures.clone();
        f.ready_to_device = Latency::from_ns(&mut self.ready_ns.clone());
        let mut per_byte = self.copy_s.clone();
        per_byte.sort_by(f64::total_cmp);
        if let Some(&m) = per_byte.get(per_byte.len() / 2) {
            f.copy_gb_per_s_p50 = if m > 0.0 { 1e-9 / m } else { 0.0 };
        }
        f
    }
}

#[cfg(feature = "cuda")]
impl Drop for DeviceSink {
    fn drop(&mut self) {
        // Copies still in flight read the ring: let them finish before `reg` unpins it.
        if let Err(e) = self.gpu.synchronize() {
            tracing::warn!("waiting for the last copies: {e}");
        }
    }
}

/// Stands in for a CUDA device when the `cuda` feature is off: [`Gpu::open`] says
/// so, and no value of it (or of [`DeviceSink`]) can exist, so their other methods are
/// never reached.
#[cfg(not(feature = "cuda"))]
pub enum Gpu {}

#[cfg(not(feature = "cuda"))]
impl Gpu {
    /// Always [`GpuError::NotBuilt`].
    pub fn open(_: u32) -> Result<Gpu, GpuError> {
        Err(GpuError::NotBuilt)
    }
    /// Unreachable.
    pub fn label(&self) -> String {
        match *self {}
    }
}

/// Stands in for the CUDA sink when the `cuda` feature is off (see [`Gpu`]).
#[cfg(not(feature = "cuda"))]
pub enum DeviceSink {}

#[cfg(not(feature = "cuda"))]
impl DeviceSink {
    /// Unreachable: no [`Gpu`] exists.
    ///
    /// # Safety
    /// None needed (it cannot be called); `unsafe` as the CUDA build's.
    pub unsafe fn new(gpu: Gpu, _: &Client, _: usize, _: bool) -> Result<DeviceSink, GpuError> {
        match gpu {}
    }
    /// Unreachable.
    ///
    /// # Safety
    /// None needed (it cannot be called); `unsafe` as the CUDA build's.
    pub unsafe fn register(&mut self, _: &Client) -> Result<(), GpuError> {
        match *self {}
    }
    /// Unreachable.
    pub fn set_verify(&mut self, _: bool) {
        match *self {}
    }
    /// Unreachable.
    pub fn unregister(&mut self) -> Result<(), GpuError> {
        match *self {}
    }
    /// Unreachable.
    pub fn submit(&mut self, _: &BatchView<'_>, _: u64) -> Result<(), GpuError> {
        match *self {}
    }
    /// Unreachable.
    pub fn retire(&mut self, _: usize) -> Result<(), GpuError> {
        match *self {}
    }
    /// Unreachable.
    pub fn figures(&self) -> DeviceFigures {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["cuda:x", "tpu:0", "cuda:", "cuda:-1", "cuda:1 ", "CPU", ""] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        let e = "cuda:99999999999".parse::<Device>().unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    /// A machine that cannot use CUDA at all skips `bench --gpu`; an ordinal past the
    /// devices a driver sees is an error, which names the devices there are.
    #[test]
    fn a_missing_device_is_an_error_naming_the_devices_there_are() {
        let e = GpuError::NoDevice {
            ordinal: 3,
            count: 2,
            present: vec!["cuda:0 (NVIDIA H100)".into(), "cuda:1 (NVIDIA H100)".into()],
        };
        assert_eq!(
            e.to_string(),
            "no CUDA device 3: the driver sees 2 (cuda:0 (NVIDIA H100), cuda:1 (NVIDIA H100))"
        );
        assert!(!e.is_unavailable());
        let none = GpuError::NoDevice {
            ordinal: 0,
            count: 0,
            present: vec![],
        };
        assert_eq!(none.to_string(), "no CUDA device 0: the driver sees 0");
        assert!(none.is_unavailable());
        for e in [
            GpuError::NotBuilt,
            GpuError::NoDriver,
            GpuError::Init("CUDA_ERROR_NO_DEVICE".into()),
        ] {
            assert!(e.is_unavailable(), "{e}");
        }
        let e = GpuError::Driver {
            what: "creating a context",
            error: "CUDA_ERROR_OUT_OF_MEMORY".into(),
        };
        assert!(!e.is_unavailable());
    }
}
