//! Generation on top of the Gemma 3 decoder: sampling (greedy, temperature, top-k, top-p,
//! min-p, penalties, seeded), constrained decoding to a JSON schema or regex (llguidance),
//! stop rules and the batched generation loop.
//!
//! Synchronous by design: services run an [`generate::Engine`] on its own thread behind a
//! bounded queue, never on the async runtime.

//!
//! Without the default `runtime` feature the crate is [`sampling`] alone: the gateway uses it
//! to validate sampling settings with the same rules as the generator.

#[cfg(feature = "runtime")]
pub mod constraint;
#[cfg(feature = "runtime")]
mod error;
#[cfg(feature = "runtime")]
pub mod generate;
pub mod sampling;

#[cfg(feature = "runtime")]
pub use error::{EngineError, Result};
