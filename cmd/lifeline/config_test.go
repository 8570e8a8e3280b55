package main

import (
	"reflect"
	"slices"
	"testing"
)

// The defaults a config leaves out are filled in by withDefaults, on a
// copy, and by nothing else: the validation after it changes nothing.
func TestDefaultsFilledOnceValidationChangesNothing(t *testing.T) {
	fc, err := parseConfig("c.yaml", []byte(`
gateway:
  listen: 127.0.0.1:0
  routes:
    - {name: a, upstream: 127.0.0.1:1}
client:
  listeners:
    - {listen: 127.0.0.1:0, gateway: h:1}
`))
	if err != nil {
		t.Fatal(err)
	}
	d := fc.withDefaults()
	if fc.Gateway.Transport != "" || fc.Client.Listeners[0].Transport != "" || fc.Client.Listeners[0].Route != "" {
		t.Errorf("withDefaults changed its input: gateway %+v, client %+v", *fc.Gateway, fc.Client.Listeners)
	}
	if l := d.Client.Listeners[0]; d.Gateway.Transport != "tls" || l.Transport != "tls" || l.Route != "default" {
		t.Errorf("defaults not filled in: gateway transport %q, listener %+v", d.Gateway.Transport, l)
	}
	g, c := *d.Gateway, clientFile{Listeners: slices.Clone(d.Client.Listeners)}
	if err := validateGateway(d.Gateway); err != nil {
		t.Fatal(err)
	}
	if err := validateClient(d.Client); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, *d.Gateway) || !reflect.DeepEqual(c, *d.Client) {
		t.Errorf("validation changed its input:\n%+v\n%+v", *d.Gateway, *d.Client)
	}
	// Without the defaults, validation refuses rather than filling them.
	if err := validateGateway(fc.Gateway); err == nil {
		t.Error("a gateway without a transport passed validation")
	}
}
