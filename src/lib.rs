//! warmstart: checkpoint an app at its warm point, restore instances in milliseconds.

pub mod sys;
