//! warmstart: checkpoint an app at its warm point, restore instances in milliseconds.

pub mod check;
pub mod sys;
