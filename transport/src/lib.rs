//! rill's cluster runtime: cluster specs, servers hosting a master and a worker, remote sessions,
//! and the TCP transport (one mio event loop, postcard-framed control messages, raw tensor bodies).
