//! Settings of the whole process that a long-running server needs and a library
//! should not make for its users: applied by `ladic-serve serve` at start-up.

/// Makes freed request bodies go back to the system. glibc's allocator raises its
/// mmap threshold each time a large block is freed, up to 32 MiB, so after a few
/// rounds of 20 MiB uploads their buffers came from the heap, whose freed memory stays
/// with the process: RSS climbed round after round (95 MB after the first round of 40
/// concurrent 20 MiB uploads, 768 MB after the fifth) and never came down. A fixed
/// threshold keeps it near its idle level after every round (docs/hardening.md).
pub fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Allocations from this size up get pages of their own, handed back to the
        /// system when they are freed.
        const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;
        // SAFETY: mallopt only changes the allocator's parameters; it is called before
        // the runtime's threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
    }
}

/// Raises the soft limit of open files to the hard one, so that the connection limit
/// (`--max-connections`), not the default soft limit of 1024 that many systems set,
/// is what bounds the connections; returns the limit in effect.
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write the struct passed, nothing else.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // rlim_t is u64 on Linux and macOS, other widths elsewhere.
        #[allow(clippy::unnecessary_cast)]
        let files = limit.rlim_cur as u64;
        Some(files)
    }
    #[cfg(not(unix))]
    None
}
