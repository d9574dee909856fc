//! Copies between host memory and the GPU for the fixed-shape denoiser calls
//! (`--cuda-graph`), made with the CUDA runtime library itself rather than through ONNX
//! Runtime.
//!
//! `ort` copies a tensor between devices by running a one-node session bound to both
//! tensors, behind one lock for the whole process: each copy costs a session run and,
//! from host memory, a copy on the host first, and it waits for other workers' copies.
//! A fixed-shape step makes up to five copies. Here each is one `cudaMemcpy` between a
//! device buffer and a page-locked host buffer of the same size.
//!
//! The library is the CUDA runtime that ONNX Runtime's CUDA provider has loaded already,
//! found by its name (newest major version first), so that both use the same CUDA
//! context.
//!
//! Ordering with the model: ONNX Runtime runs a session on its own CUDA stream (created
//! non-blocking, so the legacy default stream our copies use is not ordered with it on
//! the device) and, with the default run options, waits for it on the host before
//! `run` returns, captured graph replays included. An upload is a `cudaMemcpy`
//! followed by a synchronisation of the stream it ran on, so it is complete before the
//! next `run` starts; a download starts after `run` has returned. The fixed-shape calls
//! must therefore keep that waiting on: no `disable_synchronize_execution_providers`,
//! no asynchronous runs.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

/// Names tried in turn; the first that loads is used.
const LIBRARY_NAMES: [&str; 4] = [
    "libcudart.so.13",
    "libcudart.so.12",
    "libcudart.so.11.0",
    "libcudart.so",
];

/// dlopen's flag for "only if loaded already" (glibc and musl).
const RTLD_NOLOAD: c_int = 4;

const HOST_TO_DEVICE: c_int = 1;
const DEVICE_TO_HOST: c_int = 2;

type Memcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int;
type StreamSynchronize = unsafe extern "C" fn(*mut c_void) -> c_int;
type HostRegister = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> c_int;
type HostUnregister = unsafe extern "C" fn(*mut c_void) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastError = unsafe extern "C" fn() -> c_int;

/// Plain data: every bit pattern is a valid value, so that a buffer of it can be filled
/// from a device's bytes (f32 and i64, the element types of the denoiser's inputs and
/// output).
pub trait Plain: Copy + PartialEq + Send + Sync + 'static {}
impl Plain for f32 {}
impl Plain for i64 {}

/// The few CUDA runtime functions the copies need.
pub struct CudaRuntime {
    pub library: &'static str,
    memcpy: Memcpy,
    stream_synchronize: StreamSynchronize,
    host_register: HostRegister,
    host_unregister: HostUnregister,
    error_string: ErrorString,
    get_last_error: GetLastError,
    _library: libloading::Library,
}

impl std::fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime")
            .field("library", &self.library)
            .finish()
    }
}

static RUNTIME: OnceLock<Result<CudaRuntime, String>> = OnceLock::new();

impl CudaRuntime {
    /// The process's CUDA runtime library, loaded on first use.
    pub fn get() -> Result<&'static CudaRuntime, String> {
        RUNTIME
            .get_or_init(CudaRuntime::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The CUDA runtime library at `path`, for this process's lifetime (tests use a
    /// stand-in; the service uses [`CudaRuntime::get`]).
    pub fn load_from(path: &std::path::Path) -> Result<&'static CudaRuntime, String> {
        // SAFETY: as in `load`.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let runtime = CudaRuntime::bind("(given path)", library)?;
        Ok(Box::leak(Box::new(runtime)))
    }

    fn load() -> Result<CudaRuntime, String> {
        // First a library the process has loaded already (ONNX Runtime's CUDA provider
        // has, unless it links the runtime statically), whatever its version; then by
        // name.
        for name in LIBRARY_NAMES {
            // SAFETY: RTLD_NOLOAD only returns a library that is loaded already.
            let loaded = unsafe {
                libloading::os::unix::Library::open(
                    Some(name),
                    libloading::os::unix::RTLD_NOW | RTLD_NOLOAD,
                )
            };
            if let Ok(library) = loaded {
                return CudaRuntime::bind(name, library.into());
            }
        }
        let mut tried = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading the CUDA runtime runs only its own initialisers.
            match unsafe { libloading::Library::new(name) } {
                Ok(library) => return CudaRuntime::bind(name, library),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(format!(
            "the CUDA runtime library could not be loaded ({})",
            tried.join("; ")
        ))
    }

    fn bind(name: &'static str, library: libloading::Library) -> Result<CudaRuntime, String> {
        fn symbol<F: Copy>(library: &libloading::Library, name: &str) -> Result<F, String> {
            // SAFETY: each type above is the documented C signature of the symbol.
            unsafe { library.get::<F>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("{name}: {e}"))
        }
        Ok(CudaRuntime {
            library: name,
            memcpy: symbol(&library, "cudaMemcpy")?,
            stream_synchronize: symbol(&library, "cudaStreamSynchronize")?,
            host_register: symbol(&library, "cudaHostRegister")?,
            host_unregister: symbol(&library, "cudaHostUnregister")?,
            error_string: symbol(&library, "cudaGetErrorString")?,
            get_last_error: symbol(&library, "cudaGetLastError")?,
            _library: library,
        })
    }

    fn check(&self, what: &str, code: c_int) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) };
        Err(format!(
            "{what}: CUDA error {code} ({})",
            text.to_string_lossy()
        ))
    }

    /// Copies `host` to the device memory at `device` (at least as long), and waits
    /// until the copy is complete.
    ///
    /// # Safety
    /// `device` must point to device memory of at least `size_of_val(host)` bytes.
    pub unsafe fn upload<T: Plain>(&self, device: *mut c_void, host: &[T]) -> Result<(), String> {
        let bytes = std::mem::size_of_val(host);
        // SAFETY: the caller vouches for `device`; `host` is valid for `bytes`.
        let code = unsafe { (self.memcpy)(device, host.as_ptr().cast(), bytes, HOST_TO_DEVICE) };
        self.check("copy to the GPU", code)?;
        // SAFETY: null is the legacy default stream, which cudaMemcpy ran on.
        let code = unsafe { (self.stream_synchronize)(std::ptr::null_mut()) };
        self.check("wait for the copy to the GPU", code)
    }

    /// Fills `host` from the device memory at `device`.
    ///
    /// # Safety
    /// `device` must point to device memory of at least `size_of_val(host)` bytes that
    /// no running kernel writes.
    pub unsafe fn download<T: Plain>(
        &self,
        host: &mut [T],
        device: *const c_void,
    ) -> Result<(), String> {
        let bytes = std::mem::size_of_val(host);
        // SAFETY: the caller vouches for `device`; `host` is valid for `bytes`.
        let code =
            unsafe { (self.memcpy)(host.as_mut_ptr().cast(), device, bytes, DEVICE_TO_HOST) };
        self.check("copy from the GPU", code)
    }
}

/// Host memory is page-locked in whole pages, so each buffer has pages of its own: 64
/// KiB, the largest page size of the usual Linux hosts (4 KiB on x86-64, up to 64 KiB
/// on aarch64).
const PAGE: usize = 1 << 16;

/// A host buffer for copies to and from the GPU, page-locked when CUDA allows it (a
/// copy from pageable memory goes through a staging buffer of the driver's, at about
/// half the speed). It is allocated in whole pages of its own and never reallocates,
/// so its registration covers it alone and stays valid.
pub struct HostBuffer<T: Plain> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    layout: std::alloc::Layout,
    cuda: &'static CudaRuntime,
    pinned: bool,
}

// SAFETY: the buffer owns its memory, like a Box<[T]>.
unsafe impl<T: Plain> Send for HostBuffer<T> {}
// SAFETY: shared access only reads.
unsafe impl<T: Plain> Sync for HostBuffer<T> {}

impl<T: Plain> HostBuffer<T> {
    pub fn new(cuda: &'static CudaRuntime, len: usize, fill: T) -> Result<HostBuffer<T>, String> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.max(1).checked_next_multiple_of(PAGE))
            .ok_or_else(|| format!("a host buffer of {len} elements is too large"))?;
        let layout =
            std::alloc::Layout::from_size_align(bytes, PAGE.max(std::mem::align_of::<T>()))
                .map_err(|e| format!("host buffer of {bytes} bytes: {e}"))?;
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { std::alloc::alloc(layout) }.cast::<T>();
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| format!("out of host memory for a buffer of {bytes} bytes"))?;
        for i in 0..len {
            // SAFETY: within the allocation, aligned for T.
            unsafe { ptr.as_ptr().add(i).write(fill) };
        }
        // SAFETY: the allocation is valid for `bytes` and outlives the registration.
        let code = unsafe { (cuda.host_register)(ptr.as_ptr().cast(), bytes, 0) };
        let pinned = code == 0;
        if !pinned {
            // Clear the error, which the CUDA runtime would otherwise report again to
            // ONNX Runtime's next check.
            // SAFETY: no arguments.
            unsafe { (cuda.get_last_error)() };
            tracing::debug!(
                bytes,
                code,
                "host buffer not page-locked; copies use pageable memory"
            );
        }
        Ok(HostBuffer {
            ptr,
            len,
            layout,
            cuda,
            pinned,
        })
    }

    pub fn cuda(&self) -> &'static CudaRuntime {
        self.cuda
    }

    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    pub fn values(&self) -> &[T] {
        // SAFETY: `len` initialised values, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn values_mut(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised values, owned by self, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: registered in `new` with this pointer; allocated there with `layout`.
        unsafe {
            if self.pinned {
                (self.cuda.host_unregister)(self.ptr.as_ptr().cast());
            }
            std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_loads_or_the_error_names_every_library_tried() {
        match CudaRuntime::get() {
            Ok(cuda) => assert!(LIBRARY_NAMES.contains(&cuda.library)),
            Err(e) => {
                for name in LIBRARY_NAMES {
                    assert!(e.contains(name), "{e}");
                }
            }
        }
    }
}
