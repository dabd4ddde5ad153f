# spin: prints a line, then runs forever without exits, so that only a host signal can stop
# the VM. Used to check that SIGTERM/SIGINT end minivmm cleanly with status 128+signal.
	.code32
	.include "common.inc"

	program_start
	call uart_init
	mov $msg, %esi
	call puts
1:	jmp 1b

	.section .rodata
msg:	.asciz "spinning until a signal\n"
