package proxy

import (
	"context"
	"net"
)

// LinkListener yields links for a gateway: accepted TCP or TLS
// connections, or QUIC streams, each as a net.Conn whose Close unblocks a
// pending Read and Write.
type LinkListener interface {
	Accept() (net.Conn, error)
	Close() error
	Addr() net.Addr
}

// LinkDialer opens links from a client sidecar to a gateway. Close
// releases shared state (a QUIC connection).
type LinkDialer interface {
	Dial(ctx context.Context) (net.Conn, error)
	Close() error
}
