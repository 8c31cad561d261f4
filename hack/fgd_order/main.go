// Command fgd_order prints FGD's pod submission order for openb pod lists and seeds, as
// FGD's simulator (hkust-adsl/kubernetes-scheduler-simulator, pkg/simulator: Simulate,
// SortClusterPods, TunePodsByNodeTotalResource) builds it with Go's math/rand. It checks
// controller/sim/fill.py's fgd_order (see tests/unit/test_fgd_order.py):
//
//	go run ./hack/fgd_order ../shared/traces/alibaba-clusterdata-gpu-v2023/openb_pod_list_multigpu50.csv 42
//
// prints the number of pods, then one name per line.
package main

import (
	"encoding/csv"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
)

type pod struct {
	name        string
	gpus, milli int64
}

func (p pod) total() int64 { return p.gpus * p.milli }

func main() {
	f, err := os.Open(os.Args[1])
	if err != nil {
		panic(err)
	}
	seed, _ := strconv.ParseInt(os.Args[2], 10, 64)
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		panic(err)
	}
	col := map[string]int{}
	for i, h := range rows[0] {
		col[h] = i
	}
	var pods []pod
	for _, r := range rows[1:] {
		g, _ := strconv.ParseInt(r[col["num_gpu"]], 10, 64)
		m, _ := strconv.ParseInt(r[col["gpu_milli"]], 10, 64)
		pods = append(pods, pod{r[col["name"]], g, m})
	}
	const capacityMilli = 6212 * 1000 // the openb GPU node list
	ratio := 1.3

	rand.Seed(seed)
	_ = rand.Int()
	sorted := append([]pod(nil), pods...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].name < sorted[j].name })
	out := append([]pod(nil), sorted...)
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	var total int64
	for _, p := range out {
		total += p.total()
	}
	target := ratio * float64(capacityMilli)
	if float64(total) > target {
		for float64(total) > target {
			i := rand.Intn(len(out))
			total -= out[i].total()
			out = append(out[:i], out[i+1:]...)
		}
	} else if float64(total) < target {
		for i := 0; ; i++ {
			p := sorted[rand.Intn(len(sorted))]
			if float64(total+p.milli) > target {
				break
			}
			p.name = fmt.Sprintf("%s-tuned-%d", p.name, i)
			total += p.total()
			out = append(out, p)
		}
	}
	fmt.Println(len(out))
	for _, p := range out {
		fmt.Println(p.name)
	}
}
