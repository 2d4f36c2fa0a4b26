//! One helper the tower layers share (kept apart so that no layer imports
//! the server that stacks them).

/// The service that `poll_ready` readied, leaving a clone in its place: a
/// tower layer calls the readied one (tower's usual pattern for services
/// whose future must be `'static`).
pub fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
