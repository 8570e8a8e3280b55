// Command lifeline keeps the TCP sessions of unmodified applications alive
// through network drops. It runs as a gateway in front of a TCP service and
// as a client sidecar next to the application:
//
//	lifeline gateway --listen 0.0.0.0:7000 --upstream 127.0.0.1:6379
//	lifeline client  --listen 127.0.0.1:6380 --gateway gw.example.net:7000
//	lifeline sessions --admin-addr 127.0.0.1:9100   # list, end, move sessions
//	lifeline demo        # everything on loopback, links broken on purpose
//	lifeline bench       # throughput, latency, memory, resume, soak
//
// `lifeline help <command>` lists every flag; README.md has the details,
// docs/operations.md the admin API and the metrics.
package main
