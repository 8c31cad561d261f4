module fgdorder

go 1.20
