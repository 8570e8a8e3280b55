package resume

import (
	"testing"
	"unsafe"
)

// The structs every idle session holds stay within their size classes.
// Go puts an 8-byte header before a large object with pointers, so a
// session of 768 B is allocated from the 896 B class: 128 B more per
// session per process for one field. A change that crosses a line should
// move it knowingly (and say so in docs/bench.md).
func TestSessionStructsFitTheirSizeClasses(t *testing.T) {
	for _, c := range []struct {
		name  string
		size  uintptr
		class uintptr
	}{
		{"session", unsafe.Sizeof(session{}), 768},
		{"link", unsafe.Sizeof(link{}), 512},
	} {
		if c.size+8 > c.class {
			t.Errorf("%s is %d B, %d with its malloc header: above the %d B size class", c.name, c.size, c.size+8, c.class)
		}
	}
}
