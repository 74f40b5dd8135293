//! Generation on top of the Gemma 3 decoder: sampling (greedy, temperature, top-k, top-p,
//! min-p, penalties, seeded), constrained decoding to a JSON schema or regex (llguidance),
//! stop rules and the batched generation loop.
//!
//! Synchronous by design: services run an [`generate::Engine`] on its own thread behind a
//! bounded queue, never on the async runtime.

pub mod constraint;
mod error;
pub mod generate;
pub mod sampling;

pub use error::{EngineError, Result};
