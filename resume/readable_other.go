//go:build !unix

package resume

import (
	"errors"
	"syscall"
)

// waitReadable is unsupported here; ReadFrom then reads straight away.
func waitReadable(syscall.RawConn) error { return errors.ErrUnsupported }
