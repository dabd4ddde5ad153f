# four_ports: initialise COM1..COM4 at their standard ports (115200 8N1, FIFOs on) and print
# "hello from COMn" on each, polling that port's LSR.THRE; then power off. Each line must reach
# the backend the command line attached to that port, and no other.
	.code32
	.include "common.inc"

	program_start
	xor %edi, %edi			# port number - 1
next_port:
	movzwl port_bases(,%edi,2), %ebx
	call init_at
	mov $msg, %esi
	call puts_at
	mov %edi, %eax
	add $'1', %al
	call putc_at
	mov $'\n', %al
	call putc_at
	inc %edi
	cmp $4, %edi
	jne next_port
	jmp poweroff

# init_at: the UART at base bx to 115200 8N1, FIFOs on and cleared, DTR|RTS, no interrupts.
init_at:
	lea UART_IER(%ebx), %edx
	mov $0, %al
	out %al, %dx
	lea UART_LCR(%ebx), %edx
	mov $LCR_DLAB, %al
	out %al, %dx
	lea UART_DLL(%ebx), %edx
	mov $1, %al
	out %al, %dx
	lea UART_DLM(%ebx), %edx
	mov $0, %al
	out %al, %dx
	lea UART_LCR(%ebx), %edx
	mov $LCR_8N1, %al
	out %al, %dx
	lea UART_FCR(%ebx), %edx
	mov $FCR_ENABLE_CLEAR, %al
	out %al, %dx
	lea UART_MCR(%ebx), %edx
	mov $MCR_DTR_RTS, %al
	out %al, %dx
	ret

# putc_at: send al on the UART at base bx once its THRE is set (bounded poll).
putc_at:
	push %eax
	push %ecx
	push %edx
	mov %al, %ah
	mov $POLL_LIMIT, %ecx
1:	lea UART_LSR(%ebx), %edx
	in %dx, %al
	test $LSR_THRE, %al
	jnz 2f
	dec %ecx
	jnz 1b
2:	mov %ah, %al
	lea UART_THR(%ebx), %edx
	out %al, %dx
	pop %edx
	pop %ecx
	pop %eax
	ret

# puts_at: send the NUL-terminated string at esi on the UART at base bx.
puts_at:
	push %eax
	push %esi
1:	movb (%esi), %al
	test %al, %al
	jz 2f
	call putc_at
	inc %esi
	jmp 1b
2:	pop %esi
	pop %eax
	ret

	.section .rodata
	.balign 2
port_bases:
	.word 0x3f8, 0x2f8, 0x3e8, 0x2e8
msg:	.asciz "hello from COM"
