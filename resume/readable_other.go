//go:build !unix

package resume

import (
	"errors"
	"net"
	"syscall"
)

// waitReadable is unsupported here; ReadFrom then reads straight away.
func waitReadable(syscall.RawConn) error { return errors.ErrUnsupported }

// readNow is a plain Read here (see the unix version): it may wait.
func readNow(c *net.TCPConn, _ syscall.RawConn, p []byte) (n int, ready bool, err error) {
	n, err = c.Read(p)
	return n, true, err
}
