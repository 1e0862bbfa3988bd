// Package luascripts holds batchq's Lua scripts, one file per operation,
// embedded in the binary. Each script documents its KEYS, ARGV and reply at
// its top. lib.lua holds helpers shared by the scripts and is prepended to
// each of them, so every script runs as one self-contained EVAL.
//
// No script decodes a stored JSON array, and no caller input is ever spliced
// into a script's text: everything arrives through KEYS and ARGV.
package luascripts

import _ "embed"

//go:embed lib.lua
var lib string

var (
	//go:embed merge.lua
	merge string
	//go:embed mergemany.lua
	mergeMany string
	//go:embed claim.lua
	claim string
	//go:embed settle.lua
	settle string
	//go:embed reap.lua
	reap string
	//go:embed requeue.lua
	requeue string
	//go:embed register.lua
	register string
)

// The scripts' full source, with lib.lua in front.
var (
	Merge     = lib + merge
	MergeMany = lib + mergeMany
	Claim     = claim
	Settle    = lib + settle
	Reap      = lib + reap
	Requeue   = lib + requeue
	Register  = register
)
