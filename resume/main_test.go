package resume

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// The process's one /dev/null descriptor (for dropping acknowledged
	// bytes from a send pipe) opens on first use: open it before any test
	// counts descriptors.
	dropFromPipe(nil, 0)
	goleak.VerifyTestMain(m)
}
