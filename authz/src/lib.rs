//! Istio security API: parse, validate, evaluate, compile.
