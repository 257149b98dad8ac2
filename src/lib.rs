//! wspool's native core: a WebSocket read loop on tokio + tokio-tungstenite feeding a bounded
//! queue of jobs to a pool of native worker threads, whose results come back through a bounded
//! queue in batches. Everything outside `py` is plain Rust (no PyO3) and is tested by
//! `cargo test`; `py` (feature `python`) is the thin binding that maturin builds.

pub mod bell;
pub mod errors;
pub mod frames;
pub mod job;
pub mod journal;
pub mod json;
pub mod pool;
pub mod queue;
pub mod state;
pub mod stream;
pub mod ws;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_journal;

pub use errors::Error;
pub use job::{Data, DecodeError, DecodeMode, Job, Kind};
pub use json::{Json, Node};
pub use pool::Processor;
pub use queue::{Order, Overflow};
pub use state::StatsSnapshot;
pub use stream::{Batch, Config, Event, EventHook, Reconnect, Stream, Subscribe};
pub use ws::{Heartbeat, Outgoing};
