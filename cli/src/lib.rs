//! The kubectl-like commands of the `weft` binary (`apply`, `get`, `describe`, `delete`, `scale`, `set image`,
//! `rollout`): flags, the tables and text kubectl prints, and the verbs on top of `weft-api`'s store. Linked by
//! the binary only; no daemon depends on this crate.

pub mod describe;
pub mod owned;
pub mod rollout;
pub mod scale;
pub mod table;
pub mod verbs;
