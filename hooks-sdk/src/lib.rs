//! Everything of Thaw that runs inside a guest (the agent, the Lambda Runtime API, the hook
//! SDK) and the host-guest protocol. The in-repo test guest lives in `test-guest/`.
