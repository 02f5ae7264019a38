//! Model importers into the host IR.

pub mod tflite;
