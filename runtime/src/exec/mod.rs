//! Execution: a verified program becomes two plans (prefill and decode) for one backend
//! and kernel set, built once; a session runs them over device state that keeps its
//! buffers from allocation to drop.
//!
//! - [`plan`]: steps with resolved kernels, move-or-share arguments and state write-backs;
//! - [`kernels`]: the kernel interface, its portable (Burn) and CPU (Flex) sets;
//! - [`executor`]: the loop over a plan's steps, counted host reads;
//! - [`session`]: batches, prefill chunks, decode steps (captured and replayed where the
//!   backend records hardware graphs);
//! - [`request`]: prompts, token budgets, sampling settings, refills and completions;
//! - [`memory`]: the memory a session will hold, checked before anything is allocated;
//! - [`value`]: the rank-4 tensors values are held as.

pub mod arena;
pub mod executor;
pub mod kernels;
pub mod memory;
pub mod plan;
pub mod request;
pub mod session;
pub mod value;

pub use executor::{Executor, State, Which};
pub use kernels::KernelSet;
pub use session::{
    Completion, Finish, Request, Sampling, Session, SessionOptions, StepOutput, bind_params,
};
pub use value::Value;
