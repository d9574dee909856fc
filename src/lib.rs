//! ladic-serve: an HTTP inference service for LaDiC, a latent diffusion image
//! captioner. README.md describes the service; docs/bundle.md the model bundle.

pub mod bundle;
pub mod call_layout;
pub mod config;
pub mod device_copy;
pub mod device_loop;
pub mod fixed_shapes;
pub mod http;
pub mod kv_pool;
pub mod metrics;
pub mod pipeline;
pub mod preprocess;
pub mod process;
pub mod runtime;
pub mod sampler;
pub mod scheduler;
pub mod server;
pub mod text;
