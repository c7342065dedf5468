//! Crash-safety tests (host tier, fault-injection build); written next.
