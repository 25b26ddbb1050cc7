//! Deterministic simulation tests for the Multi-Paxos key-value store, with a
//! linearizability checker for the client histories they record.

mod linearizability;
