//go:build !unix

package resume

import (
	"io"
	"syscall"
)

// nonBlocking: elsewhere the link's reader does not write to the
// application itself (nil: a pump goroutine always does).
func nonBlocking(rc syscall.RawConn) io.Writer { return nil }
