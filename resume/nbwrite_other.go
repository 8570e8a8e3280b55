//go:build !unix

package resume

import (
	"io"
	"syscall"
)

// nonBlocking: elsewhere the link's reader does not write to the
// application itself (nil: a pump goroutine always does).
func nonBlocking(rc syscall.RawConn) io.Writer { return nil }

// inlineWrites: elsewhere only writer goroutines write to links.
const inlineWrites = false

func writevNonBlocking(rc syscall.RawConn, segs *[][]byte) error { return errWouldBlock }
