# hello: the smallest end-to-end check of the boot path, COM1 output and ACPI power off.
# Expected console output, then minivmm exits with status 0:
#   hello from a tiny guest
	.code32
	.include "common.inc"

	program_start
	call uart_init
	mov $msg, %esi
	call puts
	jmp poweroff

	.section .rodata
msg:	.asciz "hello from a tiny guest\n"
