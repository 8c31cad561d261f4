// Command etcd is the stock etcd server, built from the same
// go.etcd.io/etcd/server/v3 version that k8s.io/kubernetes pins for its own
// etcd client, so the test apiserver always talks to a supported etcd.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
